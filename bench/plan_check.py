"""Benchmark: `pkt plan`'s per-stage peak memory against what runs measure, on CPU.

    PKT_DATA_DIR=... python bench/plan_check.py                    # the offline pair: lora, seeking, kd, semalign
    PKT_DATA_DIR=... python bench/plan_check.py --cases lora kd     # some of them
    PKT_DATA_DIR=... python bench/plan_check.py --tiny              # the tiny random pair, tensor by tensor

Offline pair: each case runs the recipe (few items and steps: the peaks depend on the shapes, not on how long a run
is) in a fresh process, and reads each stage's peak resident memory from run.json (``peak_rss_gib``: file-backed pages
included, since a CPU maps weights from their safetensors files) less the process's resident memory just before the
run (Python, torch, the libraries). The plan of the same recipe is made in this process. Prints a table of plan vs
measured per stage with the ratio, and writes bench/results/plan_check.json.

Tiny pair: process memory is Python's own noise at that scale (a few MB), so the check counts tensors instead: the
same LoRA training step and generation prefill run on real tensors under the plan's byte counter
(:class:`pktransfer.plan.LiveBytes`), and their peaks are compared with the traced (fake-tensor) ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {
    "teacher": {"model": "builtin:qwen2.5-coder-1.5b-instruct"},
    "student": {"model": "builtin:qwen2.5-coder-0.5b-instruct"},
    "task": {"name": "arithmetic", "n_train": 64, "n_test": 20},
    "lora": {"r": 16, "alpha": 16, "dropout": 0.05},
    "training": {"max_steps": 2, "batch_size": 8, "max_length": 128, "save_steps": 2},
    "evaluation": {"batch_size": 20},
}
CASES = {
    "lora": {"name": "lora"},
    "seeking": {"name": "seeking", "n_seed": 4},
    "kd": {"name": "kd"},
    "semalign": {"name": "semalign", "n_seed": 4},
}

# The baseline is taken once the libraries the run will import are imported (the training and method modules,
# peft, the Trainer, the models' modeling code): 0.24 GiB of code and module objects that a run would otherwise
# import inside its first stages, where they were counted as that stage's memory (no plan counts a library's code).
CHILD = """
import json, sys
import transformers
from pktransfer.memory import rss_bytes
from pktransfer.pipeline import run
from pktransfer.recipe import recipe_from_dict
import pktransfer.training, pktransfer.methods.seeking, pktransfer.methods.semalign, pktransfer.methods.kd
from pktransfer.models.loading import resolve_source
recipe = recipe_from_dict(json.loads(sys.argv[1]))
for spec in (recipe.teacher, recipe.student):
    config = transformers.AutoConfig.from_pretrained(resolve_source(spec.model))
    transformers.AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module
base = rss_bytes()
res = run(recipe, quiet=True)
print(json.dumps({"baseline_gib": base / 2**30, "stages": res.run["stages"]}))
"""


def measure(recipe: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(recipe)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def offline(cases: list[str]) -> list[dict]:
    from pktransfer.plan import GIB, make_plan
    from pktransfer.recipe import recipe_from_dict

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            recipe = {**OFFLINE, "method": CASES[name], "output_dir": f"{tmp}/{name}"}
            plan = make_plan(recipe_from_dict(recipe), "cpu")
            got = measure(recipe)
            for st in plan.stages:
                m = got["stages"].get(st.name)
                if m is None or "peak_rss_gib" not in m:
                    continue
                measured = m["peak_rss_gib"] - got["baseline_gib"]
                rows.append({"case": name, "stage": st.name, "plan_gib": round(st.peak / GIB, 3),
                             "measured_gib": round(measured, 3), "ratio": round(st.peak / GIB / measured, 3)})  # fmt: skip
                print(f"{name:10s} {st.name:14s} plan {st.peak / GIB:6.2f}  measured {measured:6.2f}  "
                      f"ratio {rows[-1]['ratio']:.2f}", flush=True)  # fmt: skip
    return rows


def tiny() -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import STUDENT_SHAPE, TEACHER_SHAPE, save_tiny

    from pktransfer.plan import Batch, forward_peak, model_shape, real_forward_peak, real_train_step_peak, train_step_peak
    from pktransfer.recipe import recipe_from_dict

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        student = save_tiny(Path(tmp), "student", "qwen2", seed=2, **STUDENT_SHAPE)
        teacher = save_tiny(Path(tmp), "teacher", "qwen2", seed=1, **TEACHER_SHAPE)
        for dtype in ("float32", "bfloat16"):
            recipe = recipe_from_dict({"student": {"model": str(student), "dtype": dtype, "device": "cpu"},
                                       "teacher": {"model": str(teacher), "device": "cpu"},
                                       "task": {"name": "arithmetic"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}})  # fmt: skip
            shape = model_shape(recipe.student, "student", torch.device("cpu"))
            batch = Batch(4, 48, 8)
            traced = train_step_peak(shape, recipe, batch, torch.device("cpu"))[0]
            real = real_train_step_peak(shape, recipe, batch)
            rows.append({"case": f"tiny {dtype}", "stage": "train step", "plan_bytes": traced, "real_bytes": real})
            traced = forward_peak(shape, batch, logits="last")
            real = real_forward_peak(shape, batch)
            rows.append({"case": f"tiny {dtype}", "stage": "prefill", "plan_bytes": traced, "real_bytes": real})
    for r in rows:
        r["ratio"] = round(r["plan_bytes"] / r["real_bytes"], 3)
        print(f"{r['case']:14s} {r['stage']:10s} traced {r['plan_bytes']:>10d} B  real {r['real_bytes']:>10d} B  "
              f"ratio {r['ratio']:.3f}")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--tiny", action="store_true", help="the tiny pair, tensor by tensor (seconds)")
    args = ap.parse_args()
    rows = tiny() if args.tiny else offline(args.cases)
    out = ROOT / "bench" / "results" / ("plan_check_tiny.json" if args.tiny else "plan_check.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
