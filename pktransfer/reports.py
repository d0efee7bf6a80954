"""Markdown report for a run."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from pktransfer.methods import registry

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
    lines += [
        "",
        f"pktransfer {v.get('pktransfer')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}. Per-item outputs: `eval/`. Resolved recipe: `recipe.yaml`.",
        "",
    ]
    return "\n".join(lines)


# ---- comparison (pkt compare) ----------------------------------------------------------------------


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def _pm(m: dict[str, Any]) -> str:
    if m["n"] < 2:
        return f"{_pct(m['mean'])} (1 seed)"
    return f"{_pct(m['mean'])} ± {_pct(m['std'])} [{_pct(m['ci_low'])}, {_pct(m['ci_high'])}]"


def budget_in_words(result: dict[str, Any]) -> str:
    r = result["recipe"]
    t, lo, ev, task = r["training"], r["lora"], r["evaluation"], r["task"]
    steps = sorted({c["steps"] for c in result["cells"]})
    length = f"{t['max_steps']} optimiser steps" if t["max_steps"] is not None else f"{t['epochs']:g} epoch(s)"
    varied = sorted(  # a length some entry sets for itself (a sweep or an override): the recipe's is not every cell's
        {k for e in r["compare"].get("methods") or [] if isinstance(e, dict)
         for k in (*(e.get("sweep") or {}), *(e.get("overrides") or {})) if k in ("training.epochs", "training.max_steps")}
    )  # fmt: skip
    if varied:
        length = f"{length} unless the entry sets {' or '.join(k.split('.')[1] for k in varied)}"

    def items(split: str) -> str:
        return ", ".join(map(str, sorted({c["n_eval"][split] for c in result["cells"] if split in c["n_eval"]})))

    if len(ev["splits"]) == 1:
        evaluated = f"{ev['splits'][0]}, {items(ev['splits'][0])} items"
    else:  # each split with its own count (a set of counts after a list of splits read as one count per split)
        evaluated = ", ".join(f"{s} ({items(s)} items)" for s in ev["splits"])
    return (
        f"Every cell trains the student `{r['student']['model']}` on task `{task['name']}` "
        f"({task['n_train'] or 'all'} training items) for {length} ({', '.join(map(str, steps))} steps run), "
        f"batch {t['batch_size']} x {t['grad_accum']} accumulation, lr {t['lr']:g} with a {t['scheduler']} "
        f"schedule and {t['warmup_ratio']:g} warmup, max length {t['max_length']} tokens, weight decay "
        f"{t['weight_decay']:g}; LoRA r={lo['r']}, alpha={lo['alpha']:g}, dropout {lo['dropout']:g} on "
        f"{', '.join(lo['target_modules'])} (a method may train fewer of them: see the counted budget below). "
        f"Evaluation: split(s) {evaluated}, greedy decoding, "
        f"the same prompts for every model; seeds {r['compare']['seeds']} (a seed sets the LoRA init, data order "
        f"and dropout). Teacher: `{r['teacher']['model']}`."
    )


def _count(v: float | None) -> str:
    if v is None or v != v:
        return "n/a"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:.0f}"


def _seconds(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.1f}"


def primary_analysis(result: dict[str, Any]) -> list[str]:
    """The analysis the recipe declared before the grid ran, and what its family of comparisons supports."""
    s = result["summary"]
    lines = []
    for metric, f in s.get("family", {}).items():
        if not f.get("comparisons"):
            continue
        adj = "Holm-adjusted" if f["adjustment"] == "holm" else "unadjusted"
        eq = (
            f"; equivalence (TOST) within ±{100 * f['margin']:.1f} points: the {100 * (1 - 2 * f['alpha']):.0f}% "
            "bootstrap interval inside the margin"
            if f.get("margin")
            else "; no equivalence margin was declared, so no pair is called equivalent"
        )
        survivors = [
            lbl
            for lbl in s["labels"]
            if s["by_label"][lbl]["paired_vs_baseline"].get(metric, {}).get("bootstrap", {}).get("survives")
        ]
        lines += [
            f"**Primary analysis ({metric})**, declared in the recipe's `compare` section: {f['comparisons']} comparisons "
            f"with `{s['baseline']}`, two-sided bootstrap p-values {adj} at family-wise α {f['alpha']}, simultaneous "
            f"intervals at {100 * f['simultaneous_level']:.2f}% (Bonferroni){eq}. Differences that survive the "
            f"adjustment: {', '.join(survivors) if survivors else 'none'}.",
            "",
        ]
    return lines


def family_columns(b: dict[str, Any]) -> list[str]:
    """Adjusted p (bold where it survives), the simultaneous interval and the equivalence verdict of one comparison."""
    if "p_adjusted" not in b:
        return ["n/a", "n/a", "n/a"]
    p = f"{b['p_adjusted']:.3f}"
    eq = b.get("equivalence")
    verdict = "n/a" if eq is None else ("yes" if eq["equivalent"] else "not shown")
    return [
        f"**{p}**" if b["survives"] else p,
        f"[{100 * b['sim_ci_low']:+.1f}, {100 * b['sim_ci_high']:+.1f}]",
        verdict,
    ]


def learning_curve_table(result: dict[str, Any]) -> list[str]:
    """Validation accuracy at each recorded fraction of the budget, mean over seeds, for entries that kept a curve."""
    by_label: dict[str, dict[float, list[float]]] = {}
    for cell in result.get("cells", []):
        for pt in cell.get("learning_curve") or []:
            by_label.setdefault(cell["label"], {}).setdefault(round(pt["fraction"], 3), []).append(pt["validation"])
    if not by_label:
        return []
    fractions = sorted({f for curve in by_label.values() for f in curve})
    lines = [
        "### Learning curve",
        "",
        "Validation accuracy (%) with the adapter as it stood at each fraction of the training steps (mean over seeds; "
        "`evaluation.learning_curve`). A start worth k LoRA steps reaches LoRA's accuracy about k steps earlier.",
        "",
        "| method | " + " | ".join(f"{100 * f:.0f}% of the steps" for f in fractions) + " |",
        "|---|" + "---:|" * len(fractions),
    ]
    for label, curve in by_label.items():
        cells = [f"{100 * sum(v) / len(v):.1f}" if (v := curve.get(f)) else "" for f in fractions]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def reruns_section(result: dict[str, Any]) -> list[str]:
    """Cells run again after a finished result of theirs had been recorded (the report must not hide it)."""
    reruns = result.get("reruns") or []
    if not reruns:
        return []
    lines = ["### Reruns", "", "These folders were run again after a finished result had been recorded for them:", ""]
    for r in reruns:
        earlier = "; ".join(
            f"started {e['started_at']}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in e["metrics"].items() if v is not None)
            for e in r["earlier"]
        )
        lines.append(f"- `{r['folder']}` ({r['label']}, seed {r['seed']}), earlier: {earlier}")
    return [*lines, ""]


def partial_cost_labels(result: dict[str, Any]) -> set[str]:
    """Entries with a cell (grid or tuning) resumed before the cost ledger: their cost figures are lower bounds."""
    rows = [*result.get("cells", []), *(result.get("tuning") or [])]
    return {r["label"] for r in rows if r.get("cost_partial")}


def resumed_section(result: dict[str, Any]) -> list[str]:
    """Cells that stopped (a signal, a killed process) and resumed from a checkpoint, and whether their cost is whole."""
    rows = [(f"{c['label']}, seed {c['seed']}", c) for c in result.get("cells", []) if c.get("resumed")]
    rows += [(f"{t['label']}, tuning {t['key']} = {t['value']}", t) for t in result.get("tuning") or [] if t.get("resumed")]
    if not rows:
        return []
    lines = [
        "### Resumed cells",
        "",
        "These cells stopped and resumed from a checkpoint; their results are those of one uninterrupted run (same "
        "data order, same random state). Their cost is the last attempt plus the earlier attempts' training up to "
        "the checkpoint, kept in the checkpoint's cost ledger. Where no ledger was kept (the run predates it), the "
        "time, teacher work and student samples count the last attempt only: those entries' cost figures, marked †, "
        "are lower bounds.",
        "",
        "| cell | resumed at step | earlier cost |",
        "|---|---:|---|",
    ]
    for name, r in rows:
        e = r["resumed"]
        kept = (
            f"kept: {e['train_seconds']:.0f} s of training over {e['attempts']} attempt(s)"
            if e.get("cost_kept")
            else "not kept (†)"
        )
        lines.append(f"| {name} | {e['step']} | {kept} |")
    return [*lines, ""]


def teacher_cost_table(result: dict[str, Any]) -> list[str]:
    """Each entry's teacher cost over the whole comparison, caches and shared work apportioned."""
    cost = result.get("teacher_cost") or {}
    if not cost:
        return []
    lines = [
        "### Teacher cost per method, whole comparison",
        "",
        "Every cell of the entry (tuning cells and grid cells) plus an equal share of each shared job and each teacher "
        "cache its cells read. A cache keeps its build cost in its own file, so it is counted once, shared by the "
        "entries reading it, even when the run that built it did not finish; cells recorded before that counted a "
        "cache in the cell that built it. Tokens and FLOPs of shared jobs recorded before they were counted are "
        "missing; their seconds are not.",
        "",
        "| method | teacher fwd tokens | teacher bwd tokens | teacher s | of which shared work and caches s | teacher FLOPs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    partial = partial_cost_labels(result)
    caches = result.get("teacher_caches") or {}
    unkept = {label for c in caches.values() if c["cost"] is None for label in c["users"]}
    for label in result["summary"]["labels"]:
        c = cost.get(label)
        if c is None:
            continue
        marks = " †" * (label in partial) + " ‡" * (label in unkept)
        lines.append(
            f"| {label}{marks} | {_count(c['forward_tokens'])} | {_count(c['backward_tokens'])} | "
            f"{c['seconds']:.1f} | "
            f"{c['shared_seconds']:.1f} | {_count(c['flops'])} |"
        )
    lines.append("")
    if caches:
        lines += ["Teacher caches read by the cells:", "", "| cache | read by | teacher fwd tokens | teacher s | cost |"]
        lines.append("|---|---|---:|---:|---|")
        for name, c in caches.items():
            k = c["cost"]
            users = ", ".join(c["users"])
            if k is None:
                lines.append(f"| `{name}` | {users} | ? | ? | not kept (‡) |")
            else:
                share = f"shared by {len(c['users'])}" if len(c["users"]) > 1 else "one entry"
                lines.append(f"| `{name}` | {users} | {_count(k['forward_tokens'])} | {k['seconds']:.1f} | kept, {share} |")
        lines.append("")
    if unkept:
        lines += [
            "‡ reads a cache whose build cost was not kept with it (built before pktransfer kept a cache's cost, by a run "
            "whose record does not count it, e.g. an attempt that was killed): its teacher totals above are lower bounds.",
            "",
        ]
    return lines


def budget_table(result: dict[str, Any]) -> list[str]:
    """What each method actually trained and spent, counted in its runs (means over seeds)."""
    s = result["summary"]
    lines = [
        "### Budget as counted",
        "",
        "Per cell, mean over seeds. Trainable: parameters with gradients when training starts. Steps: optimizer "
        "updates. Tokens: non-padding input tokens of the batches the optimizer saw. Teacher: tokens through "
        "the teacher's forward and backward passes in this cell (a teacher cache is counted apart, in the "
        "per-method table below; cells recorded before that count a cache they built), their seconds, and FLOPs "
        "estimated as 2N per forward and 4N per backward token. "
        "Student samples: tokens the student generated for on-policy batches (gkd), and their seconds; the "
        "teacher's forward tokens include its scoring of those samples.",
        "",
        "| method | trainable | steps | tokens | teacher fwd tokens | teacher bwd tokens | teacher s | teacher FLOPs "
        "| student samples (tokens) | student sampling s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in s["labels"]:
        e = s["by_label"][label]
        sp, te = e.get("spent", {}), e.get("teacher", {})
        lines.append(
            f"| {label} | {_count(sp.get('trainable_parameters'))} | {_count(sp.get('optimizer_steps'))} | "
            f"{_count(sp.get('training_tokens'))} | {_count(te.get('forward_tokens'))} | "
            f"{_count(te.get('backward_tokens'))} | {te.get('seconds', 0.0):.1f} | {_count(te.get('flops'))} | "
            f"{_count(sp.get('student_generated_tokens'))} | {_seconds(sp.get('student_generation_seconds'))} |"
        )
    for folder, sec in result.get("shared_work_seconds", {}).items():
        lines.append(f"\nShared teacher work `{folder}` (once for all its cells): {sec:.1f} s.")
    lines.append("")
    if s.get("equal_budget"):
        lines += [
            "**Equal budget**: every cell of a seed trained the same number of parameters for the same steps "
            "on the same tokens (as counted).",
            "",
        ]
    else:
        lines += [
            "**The budgets are not equal** (as counted); what differs:",
            "",
            *[f"- {d}" for d in s.get("budget_differences", [])],
            "",
        ]
    return lines


def tuning_table(result: dict[str, Any]) -> list[str]:
    """Validation accuracy of every tuned value, the chosen one in bold (never a test-split figure)."""
    tuning = result.get("tuning") or []
    if not tuning:
        return []
    lines = [
        "## Tuning on validation",
        "",
        "Each entry was trained once per value on the tuning seed and scored on the validation items (disjoint "
        "from training and test); the best value (ties: the one listed first) ran on every seed.",
        "",
        "| method | key | value | validation accuracy (%) | n | final loss |",
        "|---|---|---|---:|---:|---:|",
    ]
    chosen = result.get("chosen", {})
    for t in tuning:
        pick = chosen.get(t["label"], {}).get(t["key"]) == t["value"]
        value = f"**{t['value']}**" if pick else str(t["value"])
        loss = t["final_loss"]
        lines.append(
            f"| {t['label']} | {t['key']} | {value} | {_pct(t['validation'])} | {t['n_validation']} | "
            f"{'n/a' if loss is None else f'{loss:.4f}'} |"
        )
    untuned = [lbl for lbl in result["summary"]["labels"] if lbl not in chosen]
    if untuned:
        lines += ["", f"Not tuned (run at the recipe's values): {', '.join(untuned)}."]
    total = sum(t["wall_seconds"] for t in tuning)
    partial = sum(bool(t.get("cost_partial")) for t in tuning)
    bound = f" (at least: {partial} resumed cell(s) counted from their last attempt, see Resumed cells)" if partial else ""
    lines += ["", f"Tuning cost: {total:.0f} s over {len(tuning)} cells{bound}.", ""]
    return lines


def letter_distribution(result: dict[str, Any]) -> list[str]:
    """Multiple choice: how often each untouched model and each trained entry (summed over its seeds) predicts each
    answer, beside how often each is right. A model that leans on one letter is answering the format or a letter
    prior, not the question; an accuracy near chance says which by this table."""
    rows = [
        (label, split, m["predicted"])
        for label, by in result.get("base", {}).items()
        for split, m in by.items()
        if m.get("predicted")
    ]
    trained: dict[tuple[str, str], dict[str, int]] = {}
    seeds: dict[tuple[str, str], int] = {}
    for cell in result.get("cells", []):
        for split, counts in cell.get("predicted", {}).items():
            total = trained.setdefault((cell["label"], split), {})
            for letter, n in counts.items():
                total[letter] = total.get(letter, 0) + n
            seeds[(cell["label"], split)] = seeds.get((cell["label"], split), 0) + 1
    rows += [
        (f"{label} ({seeds[(label, split)]} seed{'s' * (seeds[(label, split)] > 1)})", split, p)
        for (label, split), p in trained.items()
    ]
    if not rows:
        return []
    letters = list(rows[0][2])
    lines = [
        "## Predicted answers",
        "",
        "How often each model predicts each answer (counts; a trained entry's summed over its seeds):",
        "",
        "| model | split | " + " | ".join(letters) + " |",
        "|---|---|" + "---:|" * len(letters),
    ]
    lines += [f"| {label} | {split} | " + " | ".join(str(p.get(L, 0)) for L in letters) + " |" for label, split, p in rows]
    refs = [m for by in result.get("base", {}).values() for m in by.values() if m.get("reference_counts")]
    if refs:
        lines.append("| (true answers) | | " + " | ".join(str(refs[0]["reference_counts"].get(L, 0)) for L in letters) + " |")
    return [*lines, ""]


def cost_rule_section(result: dict[str, Any]) -> list[str]:
    """``compare.budget``: the rule declared in the recipe, the pilot's measurements, the estimate and what it cut."""
    b = result.get("budget")
    if not b:
        return []
    rule, pilot = b["rule"], b["pilot"]
    lines = [
        "## Cost rule",
        "",
        f"Declared in the recipe before any result: at most {rule['hours']} h; over it, drop "
        f"{', '.join(f'`{x}`' for x in rule['cut_order']) or 'nothing'} (first to last"
        f"{'; then each dropped entry that fits is taken back, the last dropped first' if rule.get('refill') else ''}"
        "). The pilot cell "
        f"(`{pilot['cell']}`) trained in {pilot['train_seconds']} s and evaluated {pilot['eval_seconds_per_item']} s per "
        f"item; estimate for {b['n_test']} test and {b['n_validation']} validation items:",
        "",
        "| entry | estimated hours | kept |",
        "|---|---:|---|",
    ]
    lines += [f"| {k} | {v} | {'no' if k in b['dropped'] else 'yes'} |" for k, v in b["estimate_hours"].items()]
    cut = ", ".join(f"`{x}`" for x in b["dropped"])
    outcome = f"dropped {cut}, leaving {b['kept_hours']} h." if cut else "nothing dropped."
    lines += [f"| untouched models | {b['base_hours']} | yes |", "", f"Whole grid {b['total_hours']} h; {outcome}", ""]
    return lines


def interim_banner(result: dict[str, Any]) -> list[str]:
    """The warning atop a report of a grid still running (``pkt compare --interim``); nothing for a final report."""
    info = result.get("interim")
    if not info:
        return []
    by_label: dict[str, list[int]] = {}
    for c in info["unfinished"]:
        by_label.setdefault(c["label"], []).append(c["seed"])
    left = "; ".join(f"{label} (seed {', '.join(map(str, seeds))})" for label, seeds in by_label.items())
    return [
        f"> **Interim report, written {info['written_at']}: {info['finished']} of {info['cells']} cells finished.** "
        f"Unfinished: {left or 'none'}. An entry's figures cover its finished seeds, and its comparison with the "
        "baseline pairs only the seeds both have, so every number here can change as cells finish; the family "
        "adjustment covers the entries present. An entry with one finished seed is compared by resampling items "
        "only, which leaves out how much results vary between seeds: no such comparison is a finding. The grid's "
        "final report is compare.md.",
        "",
    ]


def chance_table(result: dict[str, Any]) -> list[str]:
    """Each entry against the task's chance level (``compare.against_chance``), per metric."""
    c = result.get("against_chance")
    if not c:
        return []
    adj = "Holm-adjusted over the entries" if c["adjustment"] == "holm" else "unadjusted"
    lines = [
        "## Against chance",
        "",
        f"Accuracy minus the task's chance level ({_pct(c['chance'])}%) by the bootstrap over items x seeds (each item's "
        f"score paired with chance), its 95% interval, and the two-sided p-value, {adj} at α {c['alpha']} (bold: "
        "survives).",
        "",
    ]
    for metric, rows in c["by_metric"].items():
        lines += [f"### {metric}", "", "| method | seeds | Δ vs chance [95%] | p | adjusted p |", "|---|---:|---|---:|---:|"]
        for label, b in rows.items():
            p_adj = f"{b['p_adjusted']:.3f}"
            lines.append(
                f"| {label} | {b['n_seeds']} | {100 * b['mean_diff']:+.1f} [{100 * b['ci_low']:+.1f}, "
                f"{100 * b['ci_high']:+.1f}] | {b['p_two_sided']:.3f} | {f'**{p_adj}**' if b['survives'] else p_adj} |"
            )
        lines.append("")
    return lines


def render_compare_markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    base = s["baseline"]
    lines = ["# pktransfer comparison", "", *interim_banner(result), "## Budget and protocol", "", budget_in_words(result), ""]
    for cls in registry.classes():  # what each method wants a reader of the comparison to know
        own = sorted({c["label"] for c in result["cells"] if c["method"] == cls.name})
        if own:
            lines += cls.report_notes(own)
    lines += budget_table(result) + cost_rule_section(result)
    lines += teacher_cost_table(result) + reruns_section(result) + resumed_section(result)
    lines += learning_curve_table(result)
    if result.get("base"):
        lines += ["## Untouched models", "", "| model | split | n | accuracy (%) |", "|---|---|---:|---:|"]
        for label, by_split in result["base"].items():
            for split, m in by_split.items():
                lines.append(f"| {label} | {split} | {m['n']} | {_pct(m['accuracy'])} |")
        lines.append("")
    lines += letter_distribution(result)
    lines += tuning_table(result)
    groups = result.get("groups", {})
    lines += [
        "## Results",
        "",
        "Accuracy in %: mean ± sample std [95% t-interval of the mean] over seeds. **Primary comparison**: the "
        f"difference to `{base}` by a paired bootstrap over items x seeds (the same test items and seeds for "
        "both; seeds and items resampled with replacement) with its 95% percentile interval; "
        "`P(Δ≤0)` is the share of resamples with no gain. Secondary: the paired t-test across seeds (few seeds: "
        "a screen, not a verdict). MDE: the smallest true difference this grid would detect with power 0.8 given the "
        "bootstrap's standard error, unadjusted (two-sided α 0.05, the level of the unadjusted P) and adjusted (at α/m, "
        "the level Holm's first step needs: the one to read beside an adjusted p).",
        "",
        *primary_analysis(result),
    ]
    order = {"none": 0, "weights": 1, "outputs": 2, "composed": 3}
    group_name = {
        "none": "teacher-free",
        "weights": "teacher weights",
        "outputs": "teacher outputs",
        "composed": "teacher-derived start + teacher objective",
    }
    labels = sorted(s["labels"], key=lambda lbl: (order.get(groups.get(lbl, "none"), 3), s["labels"].index(lbl)))
    for metric in s["metrics"]:
        lines += [
            f"### {metric}",
            "",
            f"| group | method | seeds | accuracy | per seed | Δ vs {base}, bootstrap [95%] | P(Δ≤0) | MDE (unadj.) | "
            "MDE (adj.) | Δ by seed [t 95%] | t-test p | adjusted p | simultaneous interval | equivalent |",
            "|---|---|---:|---|---|---|---:|---:|---:|---|---:|---:|---|---|",
        ]
        for label in labels:
            e = s["by_label"][label]
            m = e["metrics"][metric]
            per_seed = ", ".join(f"{_pct(v)}" for _, v in sorted(m["per_seed"].items()))
            p = e["paired_vs_baseline"].get(metric)
            group = group_name.get(groups.get(label, ""), "")
            if p is None:
                cols = ["(baseline)", "", "", "", "", "", "", "", ""]
            else:
                b = p.get("bootstrap", {})
                boot = (
                    f"{100 * b['mean_diff']:+.1f} [{100 * b['ci_low']:+.1f}, {100 * b['ci_high']:+.1f}]"
                    if b.get("n_items")
                    else "n/a"
                )
                cols = [
                    boot,
                    f"{b['p_le_zero']:.3f}" if b.get("n_items") else "n/a",
                    _pct(b["mde"]) if b.get("n_items") else "n/a",
                    _pct(b["mde_adjusted"]) if b.get("n_items") and "mde_adjusted" in b else "n/a",
                    f"{100 * p['mean_diff']:+.1f} [{_pct(p['ci_low'])}, {_pct(p['ci_high'])}]",
                    "n/a" if p["p_value"] != p["p_value"] else f"{p['p_value']:.3f}",
                    *family_columns(b),
                ]
            lines.append(f"| {group} | {label} | {m['n']} | {_pm(m)} | {per_seed} | " + " | ".join(cols) + " |")
        d = s.get("design_mde", {}).get(metric)
        if d:
            lines += [
                "",
                f"Design: {d['n_items']} items x {d['n_seeds']} seed(s) at the baseline's {_pct(d['baseline_accuracy'])}% "
                f"would detect differences of about {_pct(d['mde'])} points or more, unadjusted, if items were the only "
                "source of variance (two independent binomial accuracies over items x seeds). It leaves out how results "
                "vary between seeds (and pairing's gain), so it is not a bound: the realised MDE columns, from the paired "
                "bootstrap over items and seeds, include both.",
            ]
        lines.append("")
    lines += chance_table(result)
    lines += [
        "## Cost",
        "",
        "Means per cell; peak is the largest anonymous RSS of any stage (shared work excluded, "
        "except KD's teacher logits, computed by the first KD cell).",
        "",
        "| method | prepare (s) | train (s) | cell wall (s) | peak anon RSS (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    partial = partial_cost_labels(result)
    for label in s["labels"]:
        c = s["by_label"][label]["cost"]
        lines.append(
            f"| {label}{' †' * (label in partial)} | {c['prepare_seconds']:.1f} | {c['train_seconds']:.1f} | "
            f"{c['wall_seconds']:.1f} | "
            f"{c['peak_rss_anon_gib']:.2f} |"
        )
    for folder, sec in result.get("shared_work_seconds", {}).items():
        lines.append(f"\nShared work `{folder}`: {sec:.1f} s (once for all its cells).")
    cells_s = sum(c["wall_seconds"] for c in result["cells"])
    tune_s = sum(t["wall_seconds"] for t in result.get("tuning") or [])
    shared_s = sum(result.get("shared_work_seconds", {}).values())
    base_s = result.get("base_seconds", 0.0)
    lines.append(
        f"\n**Total compute of this comparison**: {'at least ' * bool(partial)}"
        f"{(cells_s + tune_s + shared_s + base_s) / 3600:.2f} h "
        f"(cells {cells_s:.0f} s, tuning {tune_s:.0f} s, shared work {shared_s:.0f} s, untouched models {base_s:.0f} s)."
    )
    plots = result.get("plots", [])
    lines += [
        "",
        ("Plots: " + ", ".join(f"`{p}`" for p in plots) + ". " if plots else "")
        + "Cells: `cells/LABEL/seed-N/` (each a full run folder). Machine-readable: "
        + ("`compare.interim.json`." if result.get("interim") else "`compare.json`, `compare.csv`."),
        "",
    ]
    return "\n".join(lines)


def render_compare_csv(result: dict[str, Any]) -> str:
    return to_csv(csv_rows(result))


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    s = result["summary"]
    rows = []
    for label in s["labels"]:
        e = s["by_label"][label]
        for metric in s["metrics"]:
            m = e["metrics"][metric]
            p = e["paired_vs_baseline"].get(metric, {})
            rows.append(
                {
                    "label": label,
                    "method": e["method"],
                    "metric": metric,
                    "n_seeds": m["n"],
                    "mean": m["mean"],
                    "std": m["std"],
                    "ci95_low": m["ci_low"],
                    "ci95_high": m["ci_high"],
                    "diff_vs_baseline": p.get("mean_diff", 0.0 if label == s["baseline"] else math.nan),
                    "diff_ci95_low": p.get("ci_low", math.nan),
                    "diff_ci95_high": p.get("ci_high", math.nan),
                    "p_value": p.get("p_value", math.nan),
                    "bootstrap_diff": p.get("bootstrap", {}).get("mean_diff", math.nan),
                    "bootstrap_ci95_low": p.get("bootstrap", {}).get("ci_low", math.nan),
                    "bootstrap_ci95_high": p.get("bootstrap", {}).get("ci_high", math.nan),
                    "bootstrap_p_le_zero": p.get("bootstrap", {}).get("p_le_zero", math.nan),
                    "mde": p.get("bootstrap", {}).get("mde", math.nan),
                    "group": result.get("groups", {}).get(label, ""),
                    **{f"cost_{k}": v for k, v in e["cost"].items()},
                }
            )
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def plot_compare(result: dict[str, Any], folder: Any) -> list[Any]:
    """compare_scores.png (mean with 95% interval, seeds as dots, teacher/student lines) and compare_loss.png."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    s = result["summary"]
    out = []
    metric = "test" if "test" in s["metrics"] else s["metrics"][0]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(s["labels"]), 4))
    for i, label in enumerate(s["labels"]):
        m = s["by_label"][label]["metrics"][metric]
        err = None if m["n"] < 2 else [[100 * (m["mean"] - m["ci_low"])], [100 * (m["ci_high"] - m["mean"])]]
        ax.bar(i, 100 * m["mean"], yerr=err, capsize=6, color="#8fb3d9", edgecolor="#2b4c7e")
        ys = [100 * v for v in m["per_seed"].values()]
        ax.scatter([i] * len(ys), ys, color="#2b4c7e", zorder=3, s=14)
    for label, style in (("teacher", "--"), ("student", ":")):
        if label in result.get("base", {}) and metric in result["base"][label]:
            ax.axhline(100 * result["base"][label][metric]["accuracy"], color="gray", linestyle=style, label=label)
    ax.set_xticks(range(len(s["labels"])), s["labels"], rotation=20, ha="right")
    ax.set_ylabel(f"accuracy on {metric} (%)")
    ax.set_title("mean over seeds, 95% interval; dots: seeds")
    if result.get("base"):
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.append(folder / "compare_scores.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, label in enumerate(s["labels"]):
        color = f"C{i % 10}"
        for j, cell in enumerate(c for c in result["cells"] if c["label"] == label):
            if cell["loss_curve"]:
                steps, losses = zip(*cell["loss_curve"], strict=True)
                ax.plot(
                    steps,
                    losses,
                    color=color,
                    alpha=0.8,
                    label=label if j == 0 else None,
                    marker="o" if len(steps) == 1 else None,
                )
    if not ax.get_legend_handles_labels()[1]:
        ax.text(
            0.5,
            0.5,
            "no training loss was logged\n(no cell trained, or none logged a step)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (each method's own objective)")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(folder / "compare_loss.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out
