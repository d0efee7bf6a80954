"""Benchmark: generation with transformers (`hf`) against vLLM, side by side in one run, and a GKD sampling step with
each sampler. Run it in the vLLM environment (docs/evaluation.md, "vLLM"):

    VLLM_CPU_KVCACHE_SPACE=2 PKT_DATA_DIR=... python bench/vllm_bench.py              # student and teacher
    VLLM_CPU_KVCACHE_SPACE=2 PKT_DATA_DIR=... python bench/vllm_bench.py --models student --gsm8k 20

For each offline model (bf16) and workload (the arithmetic test split, the first N GSM8K test items in the
Open-Instruct 8-shot format), the same token ids are decoded greedily by `hf` (pktransfer's batched generate, batch 16)
and by vLLM (its engine started first and timed apart): items per second after the start, the engine's start, the
share of identical outputs and the accuracy each gives. Then a GKD sampling step on the offline student with a LoRA
(r 16 on the seven projections, B drawn small so the adapter is not a no-op): a batch of 8 arithmetic prompts
sampled at temperature 0.9 by the training model's generate, and by vLLM handed the current LoRA (the sync included),
median of 3. Prints a table and writes bench/results/vllm_bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"student": "builtin:qwen2.5-coder-0.5b-instruct", "teacher": "builtin:qwen2.5-coder-1.5b-instruct"}


def workload(loaded, task_name: str, limit: int):
    from pktransfer.data import get_task, recipe_formatter
    from pktransfer.evaluation.evaluate import model_input
    from pktransfer.recipe import recipe_from_dict

    params = {"shots": 8} if task_name == "gsm8k" else {}
    task = get_task(task_name, params, None)
    spec = recipe_from_dict({"task": {"name": task_name, "params": params}}).task
    fmt = recipe_formatter(loaded.tokenizer, task, spec, "lora")
    items = task.split("test")[:limit]
    prompts = [fmt.encode_text(model_input(fmt, task, it)) for it in items]
    return task, fmt, items, prompts


def score(task, items, texts) -> float:
    return sum(task.score(t, it)["correct"] for it, t in zip(items, texts, strict=True)) / len(items)


def compare_generation(name: str, tasks: dict[str, int]) -> list[dict]:
    from pktransfer.config import ModelSpec
    from pktransfer.evaluation import vllm_backend
    from pktransfer.evaluation.generation import generate
    from pktransfer.models import load_model

    loaded = load_model(ModelSpec(model=MODELS[name], dtype="bfloat16", device="cpu"))
    rows = []
    for task_name, limit in tasks.items():
        task, fmt, items, prompts = workload(loaded, task_name, limit)
        new = task.max_new_tokens or 16
        kw = {"max_new_tokens": new, "stop_token_ids": fmt.stop_token_ids(), "stop_strings": task.stop_strings_for(fmt.mode)}
        t0 = time.perf_counter()
        hf_texts, _ = generate(loaded.model, loaded.tokenizer, prompts, batch_size=16, **kw)
        hf_s = time.perf_counter() - t0
        eng = vllm_backend.Engine(loaded.source, "bfloat16", max(len(p) for p in prompts) + new + 8)
        t0 = time.perf_counter()
        eng.start()
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vl_texts, _ = vllm_backend.generate(eng, prompts, **kw)
        vl_s = time.perf_counter() - t0
        eng.close()
        same = sum(a == b for a, b in zip(hf_texts, vl_texts, strict=True))
        rows.append({
            "model": name, "task": task_name, "items": len(items), "max_new_tokens": new,
            "hf_items_per_s": round(len(items) / hf_s, 3), "vllm_items_per_s": round(len(items) / vl_s, 3),
            "vllm_engine_start_s": round(start_s, 1), "identical_outputs": same,
            "hf_accuracy": round(score(task, items, hf_texts), 3), "vllm_accuracy": round(score(task, items, vl_texts), 3),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    loaded.unload()
    return rows


def gkd_step(tmp: Path) -> dict:
    import torch
    from peft import get_peft_model

    from pktransfer.config import ModelSpec
    from pktransfer.evaluation import vllm_backend
    from pktransfer.methods.gkd import GkdConfig, GkdMethod
    from pktransfer.models import load_model
    from pktransfer.recipe import LoraSpec
    from pktransfer.training import lora_config

    student = load_model(ModelSpec(model=MODELS["student"], dtype="bfloat16", device="cpu"))
    spec = LoraSpec(r=16, alpha=16, dropout=0.0)
    model = get_peft_model(student.model, lora_config(spec, student.arch))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    task, fmt, _items, prompts = workload(student, "arithmetic", 8)
    gkd = GkdMethod(GkdConfig())
    gkd.max_new_tokens = task.max_new_tokens or 16
    stop = fmt.stop_token_ids()

    class Ctx:  # what GkdMethod._sample reads
        formatter = fmt
        teacher_work = None

    Ctx.student = student
    hf_times, vl_times = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        gkd._sample(model, prompts, Ctx, "student")
        hf_times.append(time.perf_counter() - t0)
    sampler = vllm_backend.LoraSampler(model, student.tokenizer, tmp / "sampler", "bfloat16", 256, seed=0)
    t0 = time.perf_counter()
    sampler.engine.start()
    start_s = time.perf_counter() - t0
    for _ in range(3):
        t0 = time.perf_counter()
        sampler.sample(prompts, temperature=0.9, max_new_tokens=gkd.max_new_tokens, stop_token_ids=stop)
        vl_times.append(time.perf_counter() - t0)
    sampler.close()
    row = {
        "gkd_batch": len(prompts),
        "hf_sample_s": round(statistics.median(hf_times), 2),
        "vllm_sample_s_with_sync": round(statistics.median(vl_times), 2),
        "vllm_engine_start_s": round(start_s, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["student", "teacher"], choices=list(MODELS))
    ap.add_argument("--gsm8k", type=int, default=50, help="GSM8K test items (0: none)")
    args = ap.parse_args()
    tasks = {"arithmetic": 60, **({"gsm8k": args.gsm8k} if args.gsm8k else {})}
    rows = [r for name in args.models for r in compare_generation(name, tasks)]
    with tempfile.TemporaryDirectory() as tmp:
        step = gkd_step(Path(tmp))
    out = ROOT / "bench" / "results" / "vllm_bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"generation": rows, "gkd_sampling": step}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
