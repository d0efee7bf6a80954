"""Benchmark: SemAlign's semantic bases and activation capture on the offline pair (CPU by default).

    python bench/semalign_bench.py                      # the offline 1.5B teacher and 0.5B student
    python bench/semalign_bench.py --batch 8 --repeats 5 --chunk 8192

Prints and writes bench/results/semalign.json with:
- bases: seconds for each model's (WᵀW)⁺ and for the pair's map M = S_Sᵀ S_T over the whole shared
  vocabulary, the peak anonymous memory the computation added, and what the dense bases S_T, S_S would
  have taken; the reference is one plain teacher forward over a training batch in the same process.
- capture: a teacher forward with the sublayer hooks plus mapping the targets into the student's space,
  against a plain teacher forward on the same batch (alternating order; median ratio).
- premise: mean cosine between the recomposed teacher targets and the student's own activations on the
  response positions, at the paired MLP outputs (1 − the activation loss at step 0) and at the last layers'
  outputs, next to the same figure through a random map of the same shape (no alignment: about 0).
- student step: forward + backward of the LoRA student with the SemAlign loss (hooks on the paired
  sublayers), against the same student's plain cross-entropy step (median ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TEACHER = "builtin:qwen2.5-coder-1.5b-instruct"
STUDENT = "builtin:qwen2.5-coder-0.5b-instruct"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternating(measured, reference, repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``measured`` and ``reference`` run back to back, alternating which goes first, and
    the median of their per-round ratio."""
    got, ref = [], []
    for i in range(repeats):
        order = [(measured, got), (reference, ref)] if i % 2 == 0 else [(reference, ref), (measured, got)]
        for fn, out in order:
            out.append(timed(fn))
    return (statistics.median(got), statistics.median(ref), statistics.median(g / r for g, r in zip(got, ref, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=TEACHER)
    ap.add_argument("--student", default=STUDENT)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--critical-layers", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "semalign.json"))
    args = ap.parse_args()

    import torch

    from pktransfer.data import PromptFormatter, encode_items, get_task
    from pktransfer.methods.semalign import capture, lm_head, sublayer, teacher_targets
    from pktransfer.models import load_model
    from pktransfer.ops.semantic import alignment_terms, gram_pinv, layer_pairs, recompose_map
    from pktransfer.recipe import LoraSpec, ModelSpec
    from pktransfer.runs import MemoryMonitor, rss_anon_bytes
    from pktransfer.training import causal_lm_loss_sum, collate_examples, lora_config, response_positions

    torch.manual_seed(0)
    teacher = load_model(ModelSpec(model=args.teacher, device="cpu", dtype="float32"))
    student = load_model(ModelSpec(model=args.student, device="cpu", dtype="float32"))
    vocab = min(teacher.arch.vocab_size, student.arch.vocab_size, len(student.tokenizer))
    fmt = PromptFormatter(student.tokenizer)
    examples = encode_items(fmt, get_task(args.task).split("train")[: args.batch], 256, "train")
    batch = collate_examples(examples, student.tokenizer.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    t_model, s_model = teacher.model.eval(), student.model

    def plain_teacher() -> None:
        with torch.no_grad():
            t_model(input_ids=ids, attention_mask=mask)

    plain_teacher()  # warm-up
    ref_forward = statistics.median(timed(plain_teacher) for _ in range(args.repeats))

    # ---- bases --------------------------------------------------------------------------------------
    w_t, w_s = lm_head(teacher, vocab), lm_head(student, vocab)
    before = rss_anon_bytes()
    with MemoryMonitor() as mon:
        t0 = time.perf_counter()
        g_t = gram_pinv(w_t, args.chunk)
        t_pinv_t = time.perf_counter() - t0
        t0 = time.perf_counter()
        g_s = gram_pinv(w_s, args.chunk)
        t_pinv_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = recompose_map(w_t, w_s, args.chunk, g_t, g_s)
        t_map = time.perf_counter() - t0
    added = max(0, int(mon.peak()["peak_rss_anon_gib"] * 2**30) - before)
    dense_bytes = vocab * (w_t.shape[1] + w_s.shape[1]) * 4
    bases = {
        "vocab": vocab,
        "d_teacher": int(w_t.shape[1]),
        "d_student": int(w_s.shape[1]),
        "chunk": args.chunk,
        "seconds_pinv_teacher": round(t_pinv_t, 2),
        "seconds_pinv_student": round(t_pinv_s, 2),
        "seconds_map": round(t_map, 2),
        "seconds_total": round(t_pinv_t + t_pinv_s + t_map, 2),
        "ratio_to_plain_teacher_forward": round((t_pinv_t + t_pinv_s + t_map) / ref_forward, 1),
        "peak_added_mib": round(added / 2**20, 1),
        "dense_bases_mib": round(dense_bytes / 2**20, 1),
    }

    # ---- capture --------------------------------------------------------------------------------------
    from pktransfer.ops.semantic import top_layers

    scores = [float(i % 7) for i in range(teacher.arch.n_layers)]  # any fixed choice: the cost is what counts
    pairs = layer_pairs(top_layers(scores, args.critical_layers), teacher.arch.n_layers, student.arch.n_layers)

    def captured() -> None:
        teacher_targets(teacher, pairs, "mlp", m, ids, mask, labels)

    captured()
    cap, ref, ratio = alternating(captured, plain_teacher, args.repeats)
    capture_info = {
        "pairs": [p.student for p in pairs],
        "median_seconds_capture": round(cap, 3),
        "median_seconds_plain": round(ref, 3),
        "ratio": round(ratio, 3),
    }

    # ---- premise: do the recomposed targets point where the student's own activations point? ------------
    pos = response_positions(labels)

    def cos_with_student(point: str, prs: list) -> list[float]:
        targets_ = teacher_targets(teacher, prs, point, m, ids, mask, labels)
        acts_: dict[int, torch.Tensor] = {}
        mods = {p.student: sublayer(s_model, student.arch, p.student - 1, point) for p in prs}
        with torch.no_grad(), capture(mods, acts_):
            s_model(input_ids=ids, attention_mask=mask)
        return [
            round(float(torch.nn.functional.cosine_similarity(acts_[p.student][:, :-1][pos].float(), t, dim=-1).mean()), 4)
            for p, t in zip(prs, targets_, strict=True)
        ]

    last = layer_pairs([teacher.arch.n_layers], teacher.arch.n_layers, student.arch.n_layers)
    g = torch.Generator().manual_seed(0)
    m_real = m
    m = torch.randn(m_real.shape, generator=g)  # a random map of the same shape: the no-alignment reference
    random_last = cos_with_student("layer", last)
    m = m_real
    premise = {
        "mean_cos_at_paired_mlp_outputs": dict(zip([p.student for p in pairs], cos_with_student("mlp", pairs), strict=True)),
        "mean_cos_last_layer_output": cos_with_student("layer", last)[0],
        "mean_cos_last_layer_output_random_map": random_last[0],
    }

    # ---- student step ---------------------------------------------------------------------------------
    from peft import get_peft_model

    config = lora_config(LoraSpec(target_modules=["up_proj", "down_proj", "v_proj", "o_proj"]), student.arch)
    config.layers_to_transform = [p.student - 1 for p in pairs]
    peft_model = get_peft_model(s_model, config)
    peft_model.train()
    targets = teacher_targets(teacher, pairs, "mlp", m, ids, mask, labels)
    acts: dict[int, torch.Tensor] = {}
    base = peft_model.base_model.model
    modules = {p.student: sublayer(base, student.arch, p.student - 1, "mlp") for p in pairs}

    def plain_step() -> None:
        out = peft_model(input_ids=ids, attention_mask=mask)
        (causal_lm_loss_sum(out.logits, labels) / pos.sum()).backward()
        peft_model.zero_grad()

    def semalign_step() -> None:
        with capture(modules, acts):
            out = peft_model(input_ids=ids, attention_mask=mask)
        act, logit = alignment_terms(
            [acts[p.student][:, :-1][pos] for p in pairs], targets, out.logits[:, :-1][pos][..., :vocab], ids[:, 1:][pos]
        )
        ((act + logit) / pos.sum()).backward()
        acts.clear()
        peft_model.zero_grad()

    plain_step()
    semalign_step()
    sem, ref, ratio = alternating(semalign_step, plain_step, args.repeats)
    step_info = {"median_seconds_semalign": round(sem, 3), "median_seconds_plain_ce": round(ref, 3), "ratio": round(ratio, 3)}

    result = {
        "teacher": args.teacher,
        "student": args.student,
        "batch": args.batch,
        "tokens_per_row": int(ids.shape[1]),
        "threads": torch.get_num_threads(),
        "plain_teacher_forward_seconds": round(ref_forward, 3),
        "bases": bases,
        "capture": capture_info,
        "premise": premise,
        "student_step": step_info,
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
