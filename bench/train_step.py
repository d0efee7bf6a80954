"""Benchmark: one LoRA training step of the offline student on CPU, against its own matmul time.

    python bench/train_step.py                       # bf16 and fp32, the fast path and the plain one
    python bench/train_step.py --dtypes bfloat16 --steps 6

The quickstart's LoRA (r 16 on all seven projections, dropout 0.05) on the offline 0.5B student, one batch of
8 arithmetic training examples (about 50 tokens each), forward + backward + AdamW step, as the trainer runs it.
For each setting: the median wall time of a step, the step's own matmul time (every mm/addmm/bmm the step runs,
recorded with their shapes, strides and dtypes through a dispatch mode, then replayed alone on fresh tensors:
the plain reference, measured in the same run) and the ratio of the two; the top operators of one profiled step
(torch.profiler, self time) show where the rest goes. Settings: ``plain`` (torch's dropout, the attention kernel
torch picks, peft's fp32 casts of activations, logits at every position), ``fast-peft`` (``training.fast_path``
with ``fused_step: false``: dropout masks drawn through geometric gaps; in bfloat16 also bf16 autocast for the fp32
LoRA weights, the math attention kernel and logits only where the loss reads them) and ``fast`` (the default: the
same with each LoRA linear as one function, pktransfer.ops.fused_lora, and torch's fused AdamW).
Writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def arithmetic_examples(tokenizer):
    """The quickstart's batch: the first 8 arithmetic training examples (about 50 tokens each)."""
    from pktransfer.data import PromptFormatter, encode_items, get_task

    return encode_items(PromptFormatter(tokenizer), get_task("arithmetic").split("train")[:8], 128, "train")


def build(dtype: str, setting: str, examples=arithmetic_examples):
    """The offline student with the quickstart's LoRA set up for ``setting``, a batch of ``examples(tokenizer)`` and
    the trainer's optimizer."""
    from pktransfer.config import LoraSpec, ModelSpec
    from pktransfer.models import load_model
    from pktransfer.training import collate_examples, fast_path, lora_config

    loaded = load_model(ModelSpec(model="builtin:qwen2.5-coder-0.5b-instruct", dtype=dtype, device="cpu"))
    from peft import get_peft_model

    spec = LoraSpec(r=16, alpha=16, dropout=0.05)
    model = get_peft_model(loaded.model, lora_config(spec, loaded.arch))
    if setting != "plain":
        fast_path(model)
    if setting == "fast":
        from pktransfer.ops.fused_lora import fuse_lora_layers

        fuse_lora_layers(model)
    batch = collate_examples(examples(loaded.tokenizer), loaded.tokenizer.pad_token_id)
    batch.pop("index")
    # the trainer's optimizer: torch's fused AdamW on the fused step (training.fused_step), the per-tensor loop otherwise
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=setting == "fast")
    model.train()
    return model, batch, opt


def step(model, batch, opt, fast: bool, attention: str = "auto") -> None:
    """One optimizer step as the trainer takes it (pktransfer.training's fast path, its attention kernel chosen by
    ``attention`` as training.cpu_attention, or the model's own loss)."""
    from pktransfer.training import cpu_bf16_training, response_ce

    if fast and next(model.parameters()).dtype == torch.bfloat16:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with cpu_bf16_training(model, attention, int(batch["input_ids"].shape[1])):
            total, n, _ = response_ce(model, inputs, batch["labels"])
            loss = total / n
    else:
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def record_matmuls(model, batch, opt, fast: bool) -> list[tuple]:
    """Every matrix multiplication one step runs: (op, [(shape, stride, dtype) of each tensor argument])."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default, torch.ops.aten.bmm.default}
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                calls.append((func, [(a.shape, a.stride(), a.dtype) if torch.is_tensor(a) else a for a in args]))
            return func(*args, **(kwargs or {}))

    with Record():
        step(model, batch, opt, fast)
    return calls


def replay_seconds(calls: list[tuple], repeats: int = 3) -> float:
    """The same matmuls, same shapes, strides and dtypes, on fresh tensors: the step's own matmul time."""
    made = []
    for func, args in calls:
        tensors = [
            torch.empty_strided(shape, stride, dtype=dtype).normal_() if isinstance(shape, torch.Size) else shape
            for shape, stride, dtype in (a if isinstance(a, tuple) else (a, None, None) for a in args)
        ]
        made.append((func, tensors))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for func, tensors in made:
            func(*tensors)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(dtype: str, setting: str, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model, batch, opt = build(dtype, setting)
    fast = setting != "plain"
    step(model, batch, opt, fast)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(model, batch, opt, fast)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    matmul = replay_seconds(record_matmuls(model, batch, opt, fast))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, batch, opt, fast)
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "dtype": dtype,
        "setting": setting,
        "tokens": int(batch["attention_mask"].sum()),
        "step_seconds_median": round(median, 3),
        "step_seconds_all": [round(t, 3) for t in times],
        "matmul_seconds_in_step": round(matmul, 3),
        "step_over_matmul": round(median / matmul, 2),
        "top_ops_profiled": [(e.key, round(e.self_cpu_time_total / 1e6, 3), e.count) for e in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--settings", nargs="*", default=["plain", "fast-peft", "fast"], choices=["plain", "fast-peft", "fast"])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    rows = []
    for dtype in args.dtypes:
        for setting in args.settings:
            r = measure(dtype, setting, args.steps)
            rows.append(r)
            print(
                f"{dtype:<9} {setting:<9} step {r['step_seconds_median']:.2f} s, matmuls {r['matmul_seconds_in_step']:.2f} s, "
                f"ratio {r['step_over_matmul']:.2f} ({r['tokens']} tokens)",
                flush=True,
            )
            for name, sec, count in r["top_ops_profiled"]:
                print(f"    {name:<40} {sec:>7.3f} s  x{count}")
    out = Path(__file__).parent / "results" / "train_step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
