"""Benchmark: rerun one recorded cell of a study from its own recipe and compare, item by item, with the record.

    python bench/rerun_record.py docs/study/arithmetic-study/cells/lora/seed-0
    # under the versions the study ran with (its constraints.txt, written by pkt compare):
    python -m venv .venv-pinned && .venv-pinned/bin/pip install -c constraints.txt \
        -c docs/study/arithmetic-study/constraints.txt ".[offline]"
    .venv-pinned/bin/python bench/rerun_record.py docs/study/arithmetic-study/cells/lora/seed-0

Reads the record's recipe.yaml (fields added since the record was made take the values that reproduce it,
``recipe.LEGACY_DEFAULTS``), reruns it into a temporary folder, and prints: the package versions of the record and
of this environment side by side, the final training loss of both, and how many per-item outputs differ (with the
first few). Writes bench/results/rerun_record.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

import pktransfer
from pktransfer.recipe import recipe_from_dict
from pktransfer.runs import as_current_schema, versions


def items(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", type=Path, help="a recorded cell folder (run.json, recipe.yaml, eval/)")
    args = ap.parse_args()
    run = json.loads((args.record / "run.json").read_text())
    fields = as_current_schema(yaml.safe_load((args.record / "recipe.yaml").read_text()))
    assert fields is not None, "the record's recipe no longer validates"
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_from_dict({**fields, "output_dir": str(Path(tmp) / "rerun")})
        new = pktransfer.run(recipe, quiet=True)
        task, splits = recipe.task.name, recipe.evaluation.splits
        diffs = {}
        for split in splits:
            old_items = items(args.record / "eval" / f"trained.{task}.{split}.items.jsonl")
            new_items = items(new.output_dir / "eval" / f"trained.{task}.{split}.items.jsonl")
            diffs[split] = [
                {"id": i, "record": old_items[i]["output"], "rerun": new_items[i]["output"]}
                for i in old_items
                if old_items[i]["output"] != new_items.get(i, {}).get("output")
            ]
        now = versions()
        print(f"{'package':<14} {'record':<16} {'this environment':<16}")
        for pkg in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy"):
            mark = "" if run["versions"].get(pkg, "?") == now.get(pkg) else "   <- differs"
            print(f"{pkg:<14} {run['versions'].get(pkg, '(not recorded)'):<16} {now.get(pkg, '?'):<16}{mark}")
        for key in ("platform", "cpu", "cpu_capability"):  # the host: another one can change the CPU kernels' rounding
            mark = "" if run["versions"].get(key, "?") == now.get(key) else "   <- differs"
            print(f"{key}: record {run['versions'].get(key, '(not recorded)')}\n  this environment {now.get(key, '?')}{mark}")
        print(f"\nfinal loss: record {run['training']['final_loss']:.6f}, rerun {new.run['training']['final_loss']:.6f}")
        for split, d in diffs.items():
            n = run["metrics"]["trained"][split]["n"]
            acc_old = run["metrics"]["trained"][split]["accuracy"]
            acc_new = new.metrics["trained"][split]["accuracy"]
            print(f"{split}: {len(d)} of {n} outputs differ; accuracy record {100 * acc_old:.1f}%, rerun {100 * acc_new:.1f}%")
            for row in d[:5]:
                print(f"    {row['id']}: record {row['record']!r}, rerun {row['rerun']!r}")
        out = Path(__file__).parent / "results" / "rerun_record.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "record": str(args.record),
                    "versions": {"record": run["versions"], "rerun": now},
                    "final_loss": {"record": run["training"]["final_loss"], "rerun": new.run["training"]["final_loss"]},
                    "differing_outputs": diffs,
                },
                indent=1,
            )
        )
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
