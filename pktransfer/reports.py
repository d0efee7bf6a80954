"""Markdown report for a run."""

from __future__ import annotations

from typing import Any

LABELS = {"teacher": "teacher", "student": "student (untouched)", "trained": "student + method"}


def results_rows(run: dict[str, Any]) -> list[tuple[str, str, str, int, float]]:
    rows = []
    for label, by_split in run.get("metrics", {}).items():
        for split, m in by_split.items():
            rows.append((label, run["recipe"]["task"]["name"], split, m["n"], m["accuracy"]))
    return rows


def render_markdown(run: dict[str, Any]) -> str:
    r = run["recipe"]
    lines = [
        f"# pktransfer run: {r['method']['name']} on {r['task']['name']}",
        "",
        f"- teacher: `{r['teacher']['model']}`",
        f"- student: `{r['student']['model']}`",
        f"- method: `{r['method']['name']}` (LoRA r={r['lora']['r']}, alpha={r['lora']['alpha']}, init={r['lora']['init']})",
        f"- seed: {run['seed']}; training: {run.get('training', {}).get('steps', 0)} steps on "
        f"{run.get('data', {}).get('n_train', '?')} items",
        "",
        "## Results",
        "",
        "| model | task | split | n | accuracy |",
        "|---|---|---|---:|---:|",
    ]
    for label, task, split, n, acc in results_rows(run):
        lines.append(f"| {LABELS.get(label, label)} | {task} | {split} | {n} | {100 * acc:.1f}% |")
    lines += ["", "## Stages", "", "| stage | seconds | peak anon RSS (GiB) |", "|---|---:|---:|"]
    for name, s in run.get("stages", {}).items():
        lines.append(f"| {name} | {s['seconds']:.1f} | {s.get('peak_rss_anon_gib', float('nan')):.2f} |")
    v = run.get("versions", {})
    lines += ["", f"pktransfer {v.get('pktransfer')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
              f"peft {v.get('peft')}. Per-item outputs: `eval/`. Resolved recipe: `recipe.yaml`.", ""]
    return "\n".join(lines)
