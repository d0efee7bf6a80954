"""Benchmark: load time and peak memory per stage of the quickstart on the offline pair.

    python bench/quickstart_stages.py                 # the full quickstart recipe
    python bench/quickstart_stages.py --n-test 20 --n-train 64   # a quicker look

Prints each stage's wall time and peak anonymous RSS (RssAnon: excludes reclaimable file-backed
pages of memory-mapped safetensors), next to the fp32 weight bytes of the model that stage holds,
and writes the figures to bench/results/quickstart_stages.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pktransfer
from pktransfer.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    pktransfer.set_threads(args.threads)
    overrides = []
    if args.n_test:
        overrides.append(f"task.n_test={args.n_test}")
    if args.n_train:
        overrides.append(f"task.n_train={args.n_train}")
    with tempfile.TemporaryDirectory() as tmp:
        overrides.append(f"output_dir={tmp}/run")
        recipe = load_recipe(args.recipe, overrides)
        res = pktransfer.run(recipe, quiet=True)
        run = res.run
    weights = {}
    from transformers import AutoConfig

    from pktransfer.models import describe_config
    from pktransfer.models.builtin import prepare_builtin

    for role in ("teacher", "student"):
        name = run["recipe"][role]["model"]
        cfg = (
            AutoConfig.from_pretrained(str(prepare_builtin(name)))
            if name.startswith("builtin:")
            else AutoConfig.from_pretrained(name)
        )
        d = describe_config(cfg, name)
        n = sum(int(__import__("math").prod(w.shape)) for w in d.weights())
        weights[role] = n * 4 / 2**30
    holder = {"load_teacher": "teacher", "eval_teacher": "teacher"}
    print(f"{'stage':<14} {'seconds':>9} {'peak anon GiB':>14} {'weights GiB':>12} {'ratio':>6}")
    for stage, s in run["stages"].items():
        w = weights[holder.get(stage, "student")]
        print(f"{stage:<14} {s['seconds']:>9.1f} {s['peak_rss_anon_gib']:>14.2f} {w:>12.2f} {s['peak_rss_anon_gib'] / w:>6.2f}")
    print(
        f"total wall {run['wall_seconds']:.0f}s; accuracy: "
        + ", ".join(f"{k} {100 * v['test']['accuracy']:.1f}%" for k, v in run["metrics"].items())
    )
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart_stages.json").write_text(
        json.dumps(
            {
                "stages": run["stages"],
                "weights_fp32_gib": weights,
                "metrics": run["metrics"],
                "wall": run["wall_seconds"],
                "versions": run["versions"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
