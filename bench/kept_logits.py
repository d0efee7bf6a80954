"""Benchmark: gkd, hidden_kd, kd and SemAlign with the LM head at response positions only, against every position.

    PKT_DATA_DIR=/path/to/data python bench/kept_logits.py               # gkd, hidden_kd, kd, semalign, 2 steps each
    PKT_DATA_DIR=/path/to/data python bench/kept_logits.py --methods gkd --steps 3
    PKT_DATA_DIR=/path/to/data python bench/kept_logits.py --methods kd --logits-cache runs/mmlu-study/shared/kd-logits

KD reads the teacher's cached top-k logits: computed once for both settings (about a quarter of an hour for the
1,000 training items on 2 cores), or read from ``--logits-cache``, e.g. the MMLU grid's (its key is the teacher, the
token ids and k, so it is the same cache).

The MMLU study's recipe (recipes/mmlu-study.yaml: the offline pair in bfloat16, its prompts, batch 8, max length
512, its training path) trains each method for a few optimizer steps through ``pktransfer.run`` twice: as shipped
(the losses read the logits of response tokens, so both models' LM heads run at those positions alone) and with
the logits at every position (the loss's ``response_logits`` switched off, as before). Printed per method and
setting, from run.json: the final loss, the peak anonymous RSS of training and seconds per step; then whether the
two adapters are equal to the bit (they must be: the same rows enter the same loss). Writes
bench/results/kept_logits.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pktransfer
from pktransfer.recipe import load_recipe

METHODS = {
    "gkd": "{name: gkd}",
    "hidden_kd": "{name: hidden_kd}",
    "kd": "{name: kd, temperature: 2.0, alpha: 0.5}",
    # the study's semalign-dual-kl with live targets and teacher logits (no caches over the 1,000 items) and
    # attribution over 8 seed samples: what differs between the two settings is the student's LM head only
    "semalign": "{name: semalign, n_seed: 8, critical_layers: 4, decomposition: dual, output_loss: kl, cache: false}",
}


def full_logits(method: str):
    """Patch the method's loss to ask for the logits at every position; returns the undo."""
    import pktransfer.methods.gkd as gkd
    import pktransfer.methods.hidden_kd as hidden_kd
    import pktransfer.methods.kd as kd
    import pktransfer.methods.semalign as semalign

    cls = {
        "gkd": gkd.GkdMethod,
        "hidden_kd": hidden_kd.HiddenKdMethod,
        "kd": kd.KdMethod,
        "semalign": semalign.SemAlignMethod,
    }[method]
    real = cls.training_loss

    def training_loss(self, ctx):
        inner = real(self, ctx)

        def loss(outputs, batch, n):
            return inner(outputs, batch, n)

        loss.response_logits = False
        return loss

    cls.training_loss = training_loss
    return lambda: setattr(cls, "training_loss", real)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/mmlu-study.yaml")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--logits-cache", default=None, help="KD's teacher logits cache to read (default: built once here)")
    args = ap.parse_args()
    from safetensors.torch import load_file

    rows: dict[str, dict[str, dict[str, float]]] = {}
    equal: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            adapters = {}
            for setting in ("response positions", "every position"):
                undo = full_logits(method) if setting == "every position" else (lambda: None)
                try:
                    recipe = load_recipe(
                        args.recipe,
                        [
                            f"method={METHODS[method]}",
                            f"training.max_steps={args.steps}",
                            f"training.save_steps={args.steps}",
                            "evaluation.teacher=false",
                            "evaluation.student=false",
                            f"output_dir={tmp}/{method}-{setting.split()[0]}",
                            *([f"method.logits_cache={args.logits_cache or tmp + '/kd-logits'}"] if method == "kd" else []),
                        ],
                    )
                    res = pktransfer.run(recipe, quiet=True, evaluate=False)
                finally:
                    undo()
                run = res.run
                rows.setdefault(method, {})[setting] = {
                    "final_loss": run["training"]["final_loss"],
                    "peak_train_gib": run["stages"]["train"]["peak_rss_anon_gib"],
                    "seconds_per_step": round(run["stages"]["train"]["seconds"] / run["training"]["steps"], 2),
                }
                adapters[setting] = load_file(str(res.output_dir / "adapter" / "adapter_model.safetensors"))
                print(f"{method}, logits at {setting}: {rows[method][setting]}", flush=True)
            a, b = adapters.values()
            equal[method] = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    print()
    print(f"{'method':<10} {'logits at':<20} {'final loss':>12} {'peak GiB':>9} {'s/step':>7}")
    for method, by in rows.items():
        for setting, r in by.items():
            loss, peak, step = r["final_loss"], r["peak_train_gib"], r["seconds_per_step"]
            print(f"{method:<10} {setting:<20} {loss:>12.6f} {peak:>9.2f} {step:>7.2f}")
        print(f"{method}: adapters equal to the bit: {equal[method]}")
    out = Path(__file__).parent / "results" / "kept_logits.json"
    out.parent.mkdir(exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else {}  # a run of some methods keeps the others' figures
    if old.get("recipe") == args.recipe and old.get("steps") == args.steps:
        rows, equal = {**old.get("methods", {}), **rows}, {**old.get("equal", {}), **equal}
    out.write_text(json.dumps({"recipe": args.recipe, "steps": args.steps, "methods": rows, "equal": equal}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
