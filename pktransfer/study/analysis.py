"""From records to numbers: a study's summary (accuracy over seeds, paired differences and bootstraps against the
baseline, the adjusted family, the equivalence verdicts, the design MDE), what each entry cost the teacher, what its
budget spent, and a contrast between any two entries of a finished grid; on top of ``ops.statistics``. ``build_result``
assembles compare.json's content; ``pktransfer.reports`` renders it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pktransfer.methods import registry
from pktransfer.ops.statistics import (
    describe,
    design_mde,
    equivalent,
    holm,
    minimum_detectable_effect,
    paired_bootstrap,
    paired_difference,
    percentile_interval,
)
from pktransfer.recipe import Recipe
from pktransfer.study.plan import Cell
from pktransfer.study.records import EQUAL_BUDGET_KEYS, SPENT_KEYS

UNTOUCHED = ("student", "teacher")


def contrast(folder: Path, a: str, b: str, split: str = "test", *, resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """A paired comparison of two entries of a finished grid (``compare.json`` in ``folder``), beyond the one
    against the baseline the report makes: A − B by seed and by the paired bootstrap over items x seeds, with
    its MDE. ``student`` / ``teacher`` stand for the untouched models, the same on every seed."""
    from pktransfer.errors import DataError

    path = folder / "compare.json"
    if not path.is_file():
        raise DataError(f"no compare.json in '{folder}'", hint="point at a finished `pkt compare` folder (or its --records)")
    data = json.loads(path.read_text())
    labels = sorted({c["label"] for c in data["cells"]})
    task = data["recipe"]["task"]["name"]

    def scores(label: str) -> dict[int, dict[str, float]]:
        if label in UNTOUCHED:
            items = folder / "base" / "eval" / f"{label}.{task}.{split}.items.jsonl"
            if not items.is_file():
                raise DataError(
                    f"the grid has no evaluation of the untouched {label} on '{split}'", hint=f"compare entries: {labels}"
                )
            rows = [json.loads(line) for line in items.read_text().splitlines() if line.strip()]
            return {-1: {str(r["id"]): float(bool(r["correct"])) for r in rows}}
        cells = {c["seed"]: c["items"].get(split, {}) for c in data["cells"] if c["label"] == label}
        if not cells:
            raise DataError(f"no entry '{label}' in {path}", hint=f"entries: {', '.join(labels)}, or student / teacher")
        return cells

    sa, sb = scores(a), scores(b)
    if -1 in sb:
        sb = {s: sb[-1] for s in sa}
    if -1 in sa:
        sa = {s: sa[-1] for s in sb}
    boot = paired_bootstrap(sa, sb, resamples=resamples, seed=seed)
    boot.pop("distribution", None)
    if not boot["n_items"]:
        raise DataError(f"'{a}' and '{b}' share no evaluated items on '{split}'", hint="compare entries of the same grid")
    boot["mde"] = minimum_detectable_effect(boot["se"])
    seeds = sorted(set(sa) & set(sb))
    means = {s: (sum(sa[s].values()) / len(sa[s]), sum(sb[s].values()) / len(sb[s])) for s in seeds}
    return {
        "a": a,
        "b": b,
        "split": split,
        "by_seed": {s: ma - mb for s, (ma, mb) in means.items()},
        "bootstrap": boot,
        "also_differ": budget_confounds(data["cells"], a, b),
    }


def budget_confounds(cells: list[dict[str, Any]], a: str, b: str) -> dict[str, list[Any]]:
    """Training-budget keys (learning rate, steps, LoRA size...) on which entries ``a`` and ``b`` ran differently: a
    contrast between them then mixes their methods with these (``compare.matched`` runs each at the other's)."""
    budgets = {lbl: next((c["budget"] for c in cells if c["label"] == lbl and "budget" in c), None) for lbl in (a, b)}
    if any(v is None for v in budgets.values()):
        return {}
    return {k: [budgets[a][k], budgets[b][k]] for k in budgets[a] if budgets[a][k] != budgets[b].get(k)}


def adjust_family(
    by_label: dict[str, Any],
    distributions: dict[tuple[str, str], Any],
    metric: str,
    *,
    alpha: float,
    adjustment: str,
    margin: float | None,
) -> dict[str, Any]:
    """Adds to each entry's bootstrap against the baseline on ``metric``: the family-adjusted p-value and whether it
    survives at ``alpha``, the simultaneous interval (Bonferroni, level 1 − α/m over the m comparisons), and the
    equivalence verdict within ±``margin``. Returns how the family was treated, for the report."""
    members = [
        lbl for lbl, e in by_label.items() if metric in e["paired_vs_baseline"] and distributions.get((lbl, metric)) is not None
    ]
    boots = [by_label[lbl]["paired_vs_baseline"][metric]["bootstrap"] for lbl in members]
    raw = [b["p_two_sided"] for b in boots]
    adjusted = holm(raw) if adjustment == "holm" else raw
    m = len(members)
    for lbl, b, p_adj in zip(members, boots, adjusted, strict=True):
        dist = distributions[(lbl, metric)]
        b["p_adjusted"] = p_adj
        b["survives"] = bool(p_adj < alpha)
        b["sim_ci_low"], b["sim_ci_high"] = percentile_interval(dist, 1 - alpha / m)
        # the MDE at the level the adjusted test first needs (Holm's first step, Bonferroni's α/m): the unadjusted MDE
        # beside an adjusted p-value would overstate what the family can detect
        b["mde_adjusted"] = minimum_detectable_effect(b["se"], alpha=alpha / m if adjustment == "holm" else alpha)
        if margin is not None:
            b["equivalence"] = equivalent(dist, margin, alpha)
    return {
        "comparisons": m,
        "alpha": alpha,
        "adjustment": adjustment,
        "simultaneous_level": 1 - alpha / m if m else None,
        "margin": margin,
    }


def against_chance(
    records: list[dict[str, Any]],
    labels: list[str],
    metrics: list[str],
    chance: float,
    *,
    resamples: int,
    seed: int,
    alpha: float,
    adjustment: str,
) -> dict[str, Any]:
    """Each entry (the baseline included) against the task's chance level, per metric: the accuracy minus chance by
    the bootstrap over items x seeds (every item's score paired with ``chance``: the same resampling as the
    comparisons with the baseline), its 95% interval, the two-sided p-value, adjusted over the family of entries
    (Holm), and whether it survives at ``alpha``."""
    out: dict[str, Any] = {"chance": chance, "alpha": alpha, "adjustment": adjustment, "by_metric": {}}
    for metric in metrics:
        rows: dict[str, dict[str, Any]] = {}
        for label in labels:
            items = {r["seed"]: r.get("items", {}).get(metric, {}) for r in records if r["label"] == label}
            items = {s: v for s, v in items.items() if v}
            if not items:
                continue
            at_chance = {s: dict.fromkeys(v, chance) for s, v in items.items()}
            boot = paired_bootstrap(items, at_chance, resamples=resamples, seed=seed)
            boot.pop("distribution", None)
            rows[label] = boot
        adjusted = (
            holm([b["p_two_sided"] for b in rows.values()]) if adjustment == "holm" else [b["p_two_sided"] for b in rows.values()]
        )
        for b, p_adj in zip(rows.values(), adjusted, strict=True):
            b["p_adjusted"] = p_adj
            b["survives"] = bool(p_adj < alpha)
        out["by_metric"][metric] = rows
    return out


def teacher_cost_per_entry(
    records: list[dict[str, Any]],
    tuning: list[dict[str, Any]],
    shared_users: dict[str, set[str]],
    shared_seconds: dict[str, float],
    shared_teacher: dict[str, dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """What each entry cost the teacher over the whole comparison: its grid cells and tuning cells (a cache built by
    the first of them, e.g. KD's logits, is counted where it was built), plus an equal share of every shared job its
    cells read (e.g. one Seeking sensitivity read by ``seeking`` and ``seeking+gkd``: half each)."""
    keys = ("forward_tokens", "backward_tokens", "seconds", "flops")
    out: dict[str, dict[str, float]] = {}

    def add(label: str, teacher: dict[str, Any], share: float = 1.0, part: str = "cells") -> None:
        e = out.setdefault(label, {**dict.fromkeys(keys, 0.0), "shared_seconds": 0.0})
        for k in keys:
            e[k] += share * float(teacher.get(k, 0.0) or 0.0)
        if part == "shared":
            e["shared_seconds"] += share * float(teacher.get("seconds", 0.0) or 0.0)

    for r in records:
        add(r["label"], r.get("teacher", {}))
    for t in tuning:
        add(t["label"], t.get("teacher", {}))
    for folder, users in shared_users.items():
        if not users:
            continue
        # a record made before shared jobs counted their teacher work holds only its wall time
        teacher = shared_teacher.get(folder) or {"seconds": shared_seconds.get(folder, 0.0)}
        for label in users:
            add(label, teacher, 1 / len(users), "shared")
    for cache in teacher_caches(records, tuning).values():
        if cache["cost"] is not None:
            for label in cache["users"]:
                add(label, cache["cost"], 1 / len(cache["users"]), "shared")
    return out


def teacher_caches(records: list[dict[str, Any]], tuning: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each teacher cache the comparison's runs read (KD's logits, SemAlign's targets): the entries whose cells or
    tuning cells read it and its build cost as kept beside it (None: built before pktransfer kept that). Runs
    recorded before caches were counted apart list none; they counted a cache in the run that built it."""
    out: dict[str, dict[str, Any]] = {}
    for r in [*records, *tuning]:
        for c in r.get("teacher", {}).get("caches", []):
            e = out.setdefault(c["file"], {"users": [], "cost": None})
            if r["label"] not in e["users"]:
                e["users"].append(r["label"])
            e["cost"] = e["cost"] or c.get("cost")
    return out


def budget_differences(records: list[dict[str, Any]]) -> list[str]:
    """What differs between the cells of one seed (same data order): trainable parameters, optimizer steps,
    training tokens. Empty = the budget is equal, as counted."""
    diffs = []
    for key in EQUAL_BUDGET_KEYS:
        for seed in sorted({r["seed"] for r in records}):
            values = {r["label"]: r["spent"].get(key) for r in records if r["seed"] == seed}
            if len(set(values.values())) > 1:
                shown = ", ".join(f"{label} {v:,}" if isinstance(v, int) else f"{label} {v}" for label, v in values.items())
                diffs.append(f"{key.replace('_', ' ')} (seed {seed}): {shown}")
                break
    return diffs


def summarize(
    records: list[dict[str, Any]],
    baseline: str,
    *,
    resamples: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
    adjustment: str = "holm",
    margin: float | None = None,
    secondary: set[str] | None = None,
) -> dict[str, Any]:
    """Per entry: accuracy over seeds, the paired t-test by seed and the paired bootstrap against ``baseline``; then,
    per metric, over the family of comparisons with the baseline: Holm-adjusted bootstrap p-values (``adjustment``)
    and whether each survives at ``alpha``, Bonferroni simultaneous intervals (level 1 − α/m), and with ``margin``
    the TOST equivalence verdict within ±margin."""
    labels = list(dict.fromkeys(r["label"] for r in records))
    metrics = sorted({m for r in records for m in r["metrics"]})
    by_label: dict[str, Any] = {}
    distributions: dict[tuple[str, str], Any] = {}
    for label in labels:
        rs = [r for r in records if r["label"] == label]
        by_label[label] = entry_summary(label, rs, records, baseline, metrics, distributions, resamples, seed)
    family = {}
    for metric in metrics:
        primary = {lbl: e for lbl, e in by_label.items() if lbl not in (secondary or set())}
        family[metric] = adjust_family(primary, distributions, metric, alpha=alpha, adjustment=adjustment, margin=margin)
    differences = budget_differences(records)
    return {
        "design_mde": design_mdes(records, baseline, metrics),
        "family": family,
        "labels": labels,
        "metrics": metrics,
        "baseline": baseline,
        "by_label": by_label,
        "equal_budget": not differences,
        "budget_differences": differences,
    }


def entry_summary(
    label: str,
    rs: list[dict[str, Any]],
    records: list[dict[str, Any]],
    baseline: str,
    metrics: list[str],
    distributions: dict[tuple[str, str], Any],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """One entry's summary (its cells ``rs``): per metric the accuracy over seeds and, against the baseline, the paired
    difference by seed and the paired bootstrap over items x seeds (whose distribution goes to ``distributions``);
    its mean cost, steps, spent budget and teacher work."""
    entry: dict[str, Any] = {"method": rs[0]["method"], "seeds": [r["seed"] for r in rs], "metrics": {}, "paired_vs_baseline": {}}
    for metric in metrics:
        values = {r["seed"]: r["metrics"][metric] for r in rs if metric in r["metrics"]}
        entry["metrics"][metric] = {**describe(list(values.values())), "per_seed": values}
        base = {r["seed"]: r["metrics"][metric] for r in records if r["label"] == baseline and metric in r["metrics"]}
        if label != baseline:
            entry["paired_vs_baseline"][metric] = paired_difference(values, base)
            items = {r["seed"]: r.get("items", {}).get(metric, {}) for r in rs}
            base_items = {r["seed"]: r.get("items", {}).get(metric, {}) for r in records if r["label"] == baseline}
            boot = paired_bootstrap(items, base_items, resamples=resamples, seed=seed)
            distributions[(label, metric)] = boot.pop("distribution", None)
            boot["mde"] = minimum_detectable_effect(boot["se"])  # nan when there was nothing to pair
            entry["paired_vs_baseline"][metric]["bootstrap"] = boot
    entry["cost"] = {k: describe([float(r[k]) for r in rs])["mean"] for k in ("prepare_seconds", "train_seconds", "wall_seconds")}
    entry["cost"]["peak_rss_anon_gib"] = max(r["peak_rss_anon_gib"] for r in rs)
    entry["cost"]["peak_cuda_gib"] = max(r["peak_cuda_gib"] for r in rs)
    entry["steps"] = sorted({r["steps"] for r in rs})
    entry["spent"] = {
        k: describe([float(r["spent"][k]) for r in rs if r["spent"].get(k) is not None])["mean"] for k in SPENT_KEYS
    }
    entry["teacher"] = {
        k: describe([float(r["teacher"].get(k, 0.0)) for r in rs])["mean"]
        for k in ("forward_tokens", "backward_tokens", "seconds", "flops")
    }
    return entry


def design_mdes(records: list[dict[str, Any]], baseline: str, metrics: list[str]) -> dict[str, Any]:
    """Per metric, the design MDE at the baseline's mean accuracy, the most items an entry was evaluated on, and the
    number of seeds (``ops.statistics.design_mde``)."""
    design = {}
    for metric in metrics:
        base_vals = [r["metrics"][metric] for r in records if r["label"] == baseline and metric in r["metrics"]]
        n_items = max((r["n_eval"].get(metric, 0) for r in records), default=0)
        n_seeds = len({r["seed"] for r in records})
        if base_vals:
            acc = sum(base_vals) / len(base_vals)
            design[metric] = {
                "baseline_accuracy": acc,
                "n_items": n_items,
                "n_seeds": n_seeds,
                "mde": design_mde(acc, n_items, n_seeds),
            }
    return design


@dataclass
class SharedLedger:
    """What the report needs of a grid's shared jobs (Seeking's sensitivity, KD's logits, ...), by shared folder:
    its wall seconds and the teacher work its run.json counted (once it has finished), and the entries whose cells
    (tuning or grid) read it."""

    seconds: dict[str, float] = field(default_factory=dict)
    users: dict[str, set[str]] = field(default_factory=dict)
    teacher: dict[str, dict[str, Any]] = field(default_factory=dict)

    def note(self, folder: str, needed: list[Cell], run_json: Path | None) -> None:
        """Count the cells in ``needed`` as users of ``folder``, and its cost from ``run_json`` when that exists."""
        self.users.setdefault(folder, set()).update(c.label for c in needed)
        if run_json is not None and run_json.is_file():
            info = json.loads(run_json.read_text())
            self.seconds[folder] = info["wall_seconds"]
            self.teacher[folder] = info.get("budget", {}).get("teacher", {})


def task_chance(recipe: Recipe) -> float:
    """The chance level the recipe's task declares (its protocol's ``chance``); a clear error for a task without one."""
    from pktransfer.data import get_task
    from pktransfer.errors import RecipeError

    chance = get_task(recipe.task.name, recipe.task.params, recipe.task.data_dir).protocol().get("chance")
    if chance is None:
        raise RecipeError(
            f"compare.against_chance: task '{recipe.task.name}' declares no chance level (its answers are not drawn "
            "from a fixed set of candidates)",
            hint="remove compare.against_chance (tasks that declare one: planted)",
        )
    return float(chance)


def chance_section(recipe: Recipe, records: list[dict[str, Any]], secondary: list[str]) -> dict[str, Any]:
    """``against_chance`` for compare.json when the recipe declared it (absent otherwise, so grids without it read
    and re-render as before); the chance level is the task's own (its protocol's ``chance``)."""
    assert recipe.compare is not None
    if not recipe.compare.against_chance:
        return {}
    chance = task_chance(recipe)
    labels = [lbl for lbl in dict.fromkeys(r["label"] for r in records) if lbl not in set(secondary)]
    metrics = sorted({m for r in records for m in r["metrics"]})
    return {
        "against_chance": against_chance(
            records,
            labels,
            metrics,
            chance,
            resamples=recipe.compare.bootstrap,
            seed=recipe.seed,
            alpha=recipe.compare.alpha,
            adjustment=recipe.compare.adjustment,
        )
    }


def build_result(
    recipe: Recipe,
    records: list[dict[str, Any]],
    *,
    secondary: list[str],
    tuning: list[dict[str, Any]],
    chosen: dict[str, dict[str, Any]],
    base_info: dict[str, Any] | None,
    shared: SharedLedger,
    reruns: list[dict[str, Any]],
    budget: dict[str, Any] | None,
) -> dict[str, Any]:
    """compare.json's content from the cells' records: the statistics and everything the report shows."""
    assert recipe.compare is not None
    return {
        "recipe": recipe.dump(),
        "cells": records,
        "summary": summarize(
            records,
            recipe.compare.baseline,
            resamples=recipe.compare.bootstrap,
            seed=recipe.seed,
            alpha=recipe.compare.alpha,
            adjustment=recipe.compare.adjustment,
            margin=recipe.compare.equivalence_margin,
            secondary=set(secondary),
        ),
        **chance_section(recipe, records, secondary),
        "secondary": secondary,
        "tuning": tuning,
        "chosen": chosen,
        "groups": {r["label"]: registry.method_class(r["method"]).teacher_use for r in records},
        "base": base_info["metrics"] if base_info else {},
        # by the folder's name under the output root (shared/<job>), so the report is the same on every machine
        "shared_work_seconds": {f"shared/{Path(f).name}": sec for f, sec in shared.seconds.items()},
        "teacher_cost": teacher_cost_per_entry(records, tuning, shared.users, shared.seconds, shared.teacher),
        "teacher_caches": teacher_caches(records, tuning),
        "reruns": reruns,
        "base_seconds": base_info.get("wall_seconds", 0.0) if base_info else 0.0,
        "budget": budget,
        "task": base_info.get("task") if base_info else None,
    }
