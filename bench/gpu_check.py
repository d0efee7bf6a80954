"""GPU checks on tiny random models (no downloads): run on a CUDA machine.

    PYTHONPATH=. python bench/gpu_check.py [--out results.json]

1. ``evaluation.batch_size: auto`` on CUDA: a real out-of-memory error (a batch-proportional allocation)
   shrinks the batch until it fits; then an evaluation with batch size auto on CUDA.
2. Every method end to end on CUDA (teacher and student on the GPU): lora, pissa, kd (live teacher),
   weight_selection, seeking, semalign (cached and live targets), laten; then semalign and laten with
   the teacher on the CPU and the student on the GPU. Prints accuracy, steps, stage times and peak
   CUDA memory.
3. Every teacher-side method (kd, seeking, semalign, laten) with the teacher sharded through accelerate
   (``teacher.device_map``): balanced over every GPU when there are several, else half its layers on GPU 0
   and half offloaded to CPU memory. Prints accuracy, teacher tokens per second and peak memory per GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import STUDENT_SHAPE, TEACHER_SHAPE, save_tiny

import pktransfer
from pktransfer.evaluation.generation import run_batched


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark checks the GPU paths")
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    root = Path(tempfile.mkdtemp())
    teacher = save_tiny(root, "teacher", "qwen2", seed=1, **TEACHER_SHAPE)
    student = save_tiny(root, "student", "qwen2", seed=2, **STUDENT_SHAPE)

    # 1a. a real CUDA out-of-memory error shrinks the batch
    free, total = torch.cuda.mem_get_info()
    per_item = 2 * 2**30  # 2 GiB per batch element
    tried = []

    class OnCuda(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="cuda"))

    def fn(bs: int) -> int:
        tried.append(bs)
        block = torch.empty(bs * per_item, dtype=torch.uint8, device="cuda")
        del block
        return bs

    t0 = time.perf_counter()
    _, used = run_batched(OnCuda(), "auto", fn, start=512)
    report["auto_batch_oom"] = {
        "free_gib": round(free / 2**30, 1),
        "total_gib": round(total / 2**30, 1),
        "gib_per_item": 2,
        "tried": tried,
        "used": used,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print("auto batch after real OOMs:", report["auto_batch_oom"])

    # 1b. evaluation with batch_size auto on CUDA
    for bs in ("auto", 4):
        t0 = time.perf_counter()
        res = pktransfer.evaluate(
            pktransfer.recipe.ModelSpec(model=str(student), device="cuda"),
            "arithmetic",
            limit=100,
            batch_size=bs,
            max_new_tokens=8,
            quiet=True,
        )
        s = res.summary
        report[f"eval_arithmetic_bs_{bs}"] = {
            "batch_size_used": s["batch_size_used"],
            "n": s["n"],
            "seconds": round(time.perf_counter() - t0, 2),
            "items_per_second": s["items_per_second"],
        }
        print(f"eval (batch_size={bs}):", report[f"eval_arithmetic_bs_{bs}"])

    # 2. every method end to end on CUDA
    base = {
        "teacher": {"model": str(teacher), "device": "cuda"},
        "student": {"model": str(student), "device": "cuda"},
        "task": {
            "name": "arithmetic",
            "n_train": 32,
            "n_test": 20,
            "params": {"sizes": {"test": 20, "train": 32, "seed": 4, "extract": 2, "align": 24}},
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "max_length": 64, "save_steps": 3},
        "evaluation": {"batch_size": "auto", "max_new_tokens": 6},
    }
    methods = [
        {"name": "lora"},
        {"name": "pissa"},
        {"name": "kd", "cache": False},
        {"name": "kd", "cache": True},
        {"name": "weight_selection"},
        {"name": "seeking", "n_seed": 4},
        {"name": "semalign", "n_seed": 4, "cache": True},
        {"name": "semalign", "n_seed": 4, "cache": False},
        {"name": "laten", "n_val": 8, "checkpoint": 2},
        {"name": "semalign", "n_seed": 4, "cache": False, "teacher_device": "cpu"},
        {"name": "laten", "n_val": 8, "checkpoint": 2, "teacher_device": "cpu"},
    ]
    report["methods"] = {}
    for i, m in enumerate(methods):
        m = dict(m)
        teacher_device = m.pop("teacher_device", "cuda")
        spec = {**base, "teacher": {**base["teacher"], "device": teacher_device}}
        recipe = pktransfer.recipe_from_dict({**spec, "method": m, "output_dir": str(root / f"run{i}")})
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = pktransfer.run(recipe, quiet=True)
        key = (
            m["name"]
            + ("" if "cache" not in m else f"(cache={m['cache']})")
            + ("" if teacher_device == "cuda" else "(teacher on cpu)")
        )
        report["methods"][key] = {
            "trained_acc": res.metrics["trained"]["test"]["accuracy"],
            "steps": res.run["training"]["steps"],
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_cuda_gib": max(s.get("peak_cuda_gib", 0) for s in res.run["stages"].values()),
        }
        print(key, report["methods"][key])
    # 3. every teacher-side method with the teacher sharded through accelerate: over every GPU when there are
    #    several, else half its layers on GPU 0 and half offloaded to CPU memory (executed on GPU 0)
    n_gpu = torch.cuda.device_count()
    if n_gpu > 1:
        sharding = {"device_map": "balanced"}
        layout = f"balanced over {n_gpu} GPUs"
    else:
        n_layers = TEACHER_SHAPE["layers"]
        split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu"}
        split |= {f"model.layers.{i}": (0 if i < n_layers // 2 else "cpu") for i in range(n_layers)}
        sharding = {"device_map": split}
        layout = "GPU 0 + CPU offload"
    report["sharded_teacher"] = {"layout": layout, "methods": {}}
    for i, m in enumerate([m for m in methods if m["name"] in ("kd", "seeking", "semalign", "laten")]):
        m = {k: v for k, v in m.items() if k != "teacher_device"}
        spec = {**base, "teacher": {**base["teacher"], **sharding}}
        recipe = pktransfer.recipe_from_dict({**spec, "method": m, "output_dir": str(root / f"sharded{i}")})
        for d in range(n_gpu):
            torch.cuda.reset_peak_memory_stats(d)
        t0 = time.perf_counter()
        res = pktransfer.run(recipe, quiet=True)
        seconds = time.perf_counter() - t0
        teacher = res.run.get("budget", {}).get("teacher", {})
        tokens = (teacher.get("forward_tokens") or 0) + (teacher.get("backward_tokens") or 0)
        key = m["name"] + ("" if "cache" not in m else f"(cache={m['cache']})")
        report["sharded_teacher"]["methods"][key] = {
            "trained_acc": res.metrics["trained"]["test"]["accuracy"],
            "seconds": round(seconds, 2),
            "teacher_tokens_per_second": round(tokens / max(teacher.get("seconds") or seconds, 1e-9), 1),
            "peak_gib_per_gpu": [round(torch.cuda.max_memory_allocated(d) / 2**30, 3) for d in range(n_gpu)],
            "peak_rss_anon_gib": max(s.get("peak_rss_anon_gib", 0) for s in res.run["stages"].values()),
        }
        print(f"sharded teacher ({layout})", key, report["sharded_teacher"]["methods"][key])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
