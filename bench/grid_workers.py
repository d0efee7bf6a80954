"""Benchmark: the wall time of one small grid run by one process and by N worker processes (pkt compare --workers).

    python bench/grid_workers.py                  # 1 and 2 workers, tiny random Qwen2 pair, 3 entries x 3 seeds
    python bench/grid_workers.py --workers 1 2 3 --steps 40

Builds a tiny random teacher/student pair in a temporary folder (no hub), then runs the same grid (lora, pissa,
kd x seeds, plus the untouched models' evaluation) from scratch with each worker count, each through the CLI as
a user would. Prints each wall time and its ratio to one process, checks the reports agree (accuracies and
paired statistics), and writes bench/results/grid_workers.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def tiny_pair(root: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import STUDENT_SHAPE, TEACHER_SHAPE, save_tiny

    return (
        save_tiny(root, "teacher", "qwen2", seed=1, **TEACHER_SHAPE),
        save_tiny(root, "student", "qwen2", seed=2, **STUDENT_SHAPE),
    )


def grid(teacher: Path, student: Path, out: Path, steps: int, seeds: int) -> dict:
    return {
        "teacher": {"model": str(teacher), "device": "cpu"},
        "student": {"model": str(student), "device": "cpu"},
        "task": {"name": "arithmetic", "n_train": 64, "n_test": 40, "params": {"sizes": {"test": 40, "train": 64}}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": steps, "batch_size": 4, "lr": 1e-3, "max_length": 64, "save_steps": steps},
        "evaluation": {"batch_size": 8, "max_new_tokens": 4},
        "output_dir": str(out),
        "compare": {"methods": ["lora", "pissa", {"name": "kd", "alpha": 0.5}], "seeds": list(range(seeds))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student = tiny_pair(root)
        for n in args.workers:
            recipe = root / f"grid-{n}.yaml"
            recipe.write_text(yaml.safe_dump(grid(teacher, student, root / f"grid-{n}", args.steps, args.seeds)))
            cmd = [sys.executable, "-m", "pktransfer.cli", "compare", str(recipe), "-q"]
            if n > 1:
                cmd += ["--workers", str(n)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            result = json.loads((root / f"grid-{n}" / "compare.json").read_text())
            by_label = result["summary"]["by_label"]
            rows[n] = {
                "wall_seconds": round(wall, 1),
                "cells": len(result["cells"]),
                "accuracy": {k: v["metrics"]["test"]["mean"] for k, v in by_label.items()},
            }
            print(f"{n} worker(s): {wall:.1f} s for {rows[n]['cells']} cells", flush=True)
    one = rows.get(1)
    print(f"\n{'workers':>8} {'wall s':>8} {'x one process':>14} {'same accuracies':>16}")
    for n, r in rows.items():
        ratio = r["wall_seconds"] / one["wall_seconds"] if one else float("nan")
        same = "yes" if one and r["accuracy"] == one["accuracy"] else ("-" if not one else "NO")
        print(f"{n:>8} {r['wall_seconds']:>8.1f} {ratio:>14.2f} {same:>16}")
    out = Path(__file__).parent / "results" / "grid_workers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "runs": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
