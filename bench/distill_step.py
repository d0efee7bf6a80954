"""Benchmark: the per-step cost of on-policy distillation against plain LoRA, on the offline pair (CPU, bfloat16).

    python bench/distill_step.py                  # lora, kd, gkd (lmbda 0.5 and 1), seeking + gkd, hidden_kd
    python bench/distill_step.py --steps 4 --methods lora gkd

Every method trains the arithmetic study's student (recipes/gkd-arithmetic.yaml: r 16 on all projections, batch
8, max length 128) for the same few optimizer steps through ``pktransfer.run`` (no evaluation). Printed per
method, from its run.json: seconds per optimizer step (the train stage over its steps), peak anonymous RSS
during training, student tokens generated per step (on-policy samples), teacher forward tokens per step, and
each ratio to LoRA measured in the same invocation. Seeking's sensitivity (a one-off cost before training) is
taken over only 4 seed samples here: it is not part of the step. Writes bench/results/distill_step.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pktransfer
from pktransfer.recipe import load_recipe

METHODS = {
    "lora": "{name: lora}",
    "kd": "{name: kd}",
    "gkd": "{name: gkd, lmbda: 0.5}",
    "gkd-onpolicy": "{name: gkd, lmbda: 1.0}",
    "seeking+gkd": "{name: compose, start: {name: seeking, n_seed: 4}, objective: {name: gkd, lmbda: 0.5}}",
    "hidden_kd": "{name: hidden_kd}",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/gkd-arithmetic.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    pktransfer.set_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.methods:
            recipe = load_recipe(
                args.recipe,
                [
                    f"method={METHODS[label]}",
                    f"training.max_steps={args.steps}",
                    f"training.save_steps={args.steps}",
                    "training.fast_path=true",  # the default path (the recipe keeps the study's plain one)
                    "evaluation.teacher=false",
                    "evaluation.student=false",
                    f"output_dir={tmp}/{label}",
                ],
            )
            run = pktransfer.run(recipe, quiet=True, evaluate=False).run
            steps = run["training"]["steps"]
            budget = run["budget"]
            rows[label] = {
                "steps": steps,
                "seconds_per_step": run["stages"]["train"]["seconds"] / steps,
                "peak_train_gib": run["stages"]["train"]["peak_rss_anon_gib"],
                "generated_tokens_per_step": (budget.get("student_generated_tokens") or 0) / steps,
                "generation_seconds_per_step": (budget.get("student_generation_seconds") or 0) / steps,
                "teacher_forward_tokens_per_step": budget["teacher"]["forward_tokens"] / steps,
                "training_tokens_per_step": (budget.get("training_tokens") or 0) / steps,
                "on_policy_batches": budget.get("on_policy_batches"),
            }
            print(f"{label}: {rows[label]['seconds_per_step']:.2f} s/step", flush=True)
    ref = rows.get("lora")
    print()
    print(
        f"{'method':<14} {'s/step':>7} {'x lora':>7} {'peak GiB':>9} {'x lora':>7} {'gen tok/step':>13} "
        f"{'gen s/step':>11} {'teacher tok/step':>17} {'on-policy':>10}"
    )
    for label, r in rows.items():
        t_ratio = r["seconds_per_step"] / ref["seconds_per_step"] if ref else float("nan")
        m_ratio = r["peak_train_gib"] / ref["peak_train_gib"] if ref else float("nan")
        print(
            f"{label:<14} {r['seconds_per_step']:>7.2f} {t_ratio:>7.2f} {r['peak_train_gib']:>9.2f} {m_ratio:>7.2f} "
            f"{r['generated_tokens_per_step']:>13.1f} {r['generation_seconds_per_step']:>11.2f} "
            f"{r['teacher_forward_tokens_per_step']:>17.0f} {str(r['on_policy_batches'] or 0) + '/' + str(r['steps']):>10}"
        )
    out = Path(__file__).parent / "results" / "distill_step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"recipe": args.recipe, "steps": args.steps, "methods": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
