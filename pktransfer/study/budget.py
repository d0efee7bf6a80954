"""Which entries the compute allows: ``compare.budget``, a cost rule declared before any result is seen.

One pilot cell is run first (the baseline's first tuning cell, else its first grid cell); from its measured training
and evaluation time the whole grid is estimated, each entry's training weighted by its declared cost factor; while
the estimate exceeds the budget, the entries of the cut order are dropped, first to last (with ``refill``, a dropped
entry that fits in what is left is then taken back, the last dropped first). The decision is written to
``budget.json`` and kept for every later sitting: it is never re-made once results exist. The estimating functions
are pure; ``apply_budget`` runs the pilot and keeps the decision.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pktransfer.errors import RecipeError
from pktransfer.fileio import write_text
from pktransfer.progress import Progress
from pktransfer.recipe import Recipe
from pktransfer.study.plan import expand_entries, grid_counts, plan_grid, plan_tuning, without_entries
from pktransfer.study.schedule import run_claimed


def estimate_grid(
    counts: dict[str, tuple[int, int]],
    *,
    train_seconds: float,
    item_seconds: float,
    n_validation: int,
    n_test: int,
    factors: dict[str, float],
    teacher_eval_factor: float,
    matched: dict[tuple[str, str], int] | None = None,
) -> tuple[dict[str, float], float, dict[tuple[str, str], float]]:
    """Seconds per entry and for the untouched models' evaluation. ``counts``: label -> (tuning cells, grid cells);
    ``matched``: (label, partner) -> the label's cells at its partner's settings (``compare.matched``). A cell costs
    ``factor`` x the pilot's training plus its evaluation items. Returns per entry (its matched cells included), the
    untouched models, and the matched cells' seconds per (label, partner)."""
    cell = {label: factors.get(label, 1.0) * train_seconds + n_test * item_seconds for label in counts}
    matched_s = {pair: n * cell[pair[0]] for pair, n in (matched or {}).items()}
    per_entry = {
        label: n_tune * (factors.get(label, 1.0) * train_seconds + n_validation * item_seconds)
        + n_grid * cell[label]
        + sum(s for (x, _), s in matched_s.items() if x == label)
        for label, (n_tune, n_grid) in counts.items()
    }
    return per_entry, n_test * item_seconds * (1.0 + teacher_eval_factor), matched_s


def remaining_seconds(
    per_entry: dict[str, float],
    base_seconds: float,
    dropped: list[str],
    matched: dict[tuple[str, str], float] | None = None,
) -> float:
    """The estimate without the ``dropped`` entries, nor the cells kept entries would run at a dropped partner's
    settings (``matched``)."""
    kept = base_seconds + sum(v for k, v in per_entry.items() if k not in dropped)
    return kept - sum(s for (x, partner), s in (matched or {}).items() if partner in dropped and x not in dropped)


def remaining_seconds_of_cells(
    pending: list[str], finished: dict[str, list[float]], tuned: dict[str, list[float]]
) -> float | None:
    """The time the pending cells (one label each) will take: each at its entry's mean wall time over the grid's
    finished cells, else over its tuning cells (they evaluate fewer items), else the mean of every finished and
    tuning cell. None when nothing has been measured yet."""
    every = [x for xs in (*finished.values(), *tuned.values()) for x in xs]
    if not every:
        return None
    fallback = sum(every) / len(every)

    def one(label: str) -> float:
        measured = finished.get(label) or tuned.get(label)
        return sum(measured) / len(measured) if measured else fallback

    return sum(one(label) for label in pending)


def cut_to_budget(
    per_entry: dict[str, float],
    base_seconds: float,
    hours: float,
    cut_order: list[str],
    matched: dict[tuple[str, str], float] | None = None,
) -> list[str]:
    """The labels of ``cut_order`` dropped, first to last, until the estimate fits ``hours`` (all of them if it never
    does: the rule is applied as written, and the report states the remaining estimate). Dropping an entry also drops
    its partners' cells at its settings (``matched``)."""
    dropped: list[str] = []
    for label in cut_order:
        if remaining_seconds(per_entry, base_seconds, dropped, matched) <= hours * 3600:
            break
        dropped.append(label)
    return dropped


def refill(
    dropped: list[str],
    per_entry: dict[str, float],
    base_seconds: float,
    hours: float,
    matched: dict[tuple[str, str], float] | None = None,
) -> list[str]:
    """``compare.budget.refill``: after the cut, each dropped entry is taken back, the last dropped (the most valued)
    first, if the estimate with it still fits ``hours``; returns the entries that stay dropped, in cut order."""
    out = list(dropped)
    for label in reversed(dropped):
        trial = [x for x in out if x != label]
        if remaining_seconds(per_entry, base_seconds, trial, matched) <= hours * 3600:
            out = trial
    return out


def apply_budget(
    recipe: Recipe, root: Path, records_dir: Path | None, progress: Progress, record: Callable[[Path], None]
) -> tuple[Recipe, dict[str, Any]]:
    """Run the pilot cell (once), estimate the grid, apply ``compare.budget``'s cut order; the decision is kept in
    ``budget.json`` and never re-made. Returns the recipe without the dropped entries and the decision."""
    assert recipe.compare is not None and recipe.compare.budget is not None
    check_cut_order(recipe)
    path = root / "budget.json"
    if not path.is_file() and records_dir is not None and (records_dir / "budget.json").is_file():
        shutil.copy2(records_dir / "budget.json", path)
    if path.is_file():
        decision = json.loads(path.read_text())
    else:
        decision = decide(recipe, run_pilot(recipe, root, progress, record))
        write_text(path, json.dumps(decision, indent=1))
        if records_dir is not None:
            shutil.copy2(path, records_dir / "budget.json")
    progress.log(
        f"compare: budget {decision['rule']['hours']} h; the pilot estimates {decision['total_hours']} h for the whole grid "
        f"({', '.join(f'{k} {v} h' for k, v in decision['estimate_hours'].items())}; untouched models "
        f"{decision['base_hours']} h)"
    )
    if decision["dropped"]:
        progress.log(f"compare: the recipe's cut order drops {', '.join(decision['dropped'])}: {decision['kept_hours']} h remain")
    return without_entries(recipe, decision["dropped"]), decision


def check_cut_order(recipe: Recipe) -> None:
    """The cut order names entries of the grid, never the baseline."""
    assert recipe.compare is not None and recipe.compare.budget is not None
    spec, budget = recipe.compare, recipe.compare.budget
    labels = [lbl for lbl, _, _ in expand_entries(recipe)]
    unknown = [x for x in budget.cut_order if x not in labels]
    if unknown or spec.baseline in budget.cut_order:
        raise RecipeError(
            f"compare.budget.cut_order names {unknown or [spec.baseline]}: "
            + ("not entries of the grid" if unknown else "the baseline, which every comparison needs"),
            hint=f"list entry labels other than the baseline: {', '.join(x for x in labels if x != spec.baseline)}",
        )


def run_pilot(recipe: Recipe, root: Path, progress: Progress, record: Callable[[Path], None]) -> dict[str, Any]:
    """Run the pilot cell (the baseline's first tuning cell, else its first grid cell) and measure it: its folder, its
    training seconds (every stage but evaluation), its evaluation seconds and items."""
    from pktransfer import pipeline
    from pktransfer.memory import release_memory

    assert recipe.compare is not None
    baseline = recipe.compare.baseline
    tune_cells = [tc.cell for tc in plan_tuning(recipe) if tc.label == baseline]
    pilot = tune_cells[0] if tune_cells else next(c for c in plan_grid(recipe) if c.label == baseline)
    where = pilot.folder.resolve().relative_to(root).as_posix()
    what = f"pilot: {pilot.label}, seed {pilot.seed} ({where}), to estimate the grid's cost"

    def job() -> None:
        pipeline.run(pilot.recipe, progress=progress, cache_dir=root / "shared")
        release_memory()

    run_claimed([(pilot.folder, what, job)], progress)
    record(pilot.folder)
    run = json.loads((pilot.folder / "run.json").read_text())
    stages = run["stages"]
    return {
        "cell": where,
        "train_seconds": sum(v["seconds"] for k, v in stages.items() if not k.startswith("eval")),
        "eval_seconds": sum(v["seconds"] for k, v in stages.items() if k.startswith("eval")),
        "n_eval": sum(m["n"] for m in run["metrics"]["trained"].values()),
    }


def decide(recipe: Recipe, pilot: dict[str, Any]) -> dict[str, Any]:
    """The budget decision from the pilot's measurements: the estimate per entry and the entries the cut order drops."""
    from pktransfer import pipeline
    from pktransfer.data import get_task

    assert recipe.compare is not None and recipe.compare.budget is not None
    budget = recipe.compare.budget
    task = get_task(recipe.task.name, recipe.task.params, recipe.task.data_dir)
    n_test = len(pipeline._eval_items(task, "test", recipe))
    n_val = len(pipeline._eval_items(task, "validation", recipe)) if recipe.task.validation else 0
    item_s = pilot["eval_seconds"] / max(pilot["n_eval"], 1)
    counts, matched_cells = grid_counts(recipe)
    per_entry, base_s, matched_s = estimate_grid(
        counts,
        matched=matched_cells,
        train_seconds=pilot["train_seconds"],
        item_seconds=item_s,
        n_validation=n_val,
        n_test=n_test,
        factors=budget.cost_factors,
        teacher_eval_factor=budget.teacher_eval_factor,
    )
    dropped = cut_to_budget(per_entry, base_s, budget.hours, budget.cut_order, matched_s)
    if budget.refill:
        dropped = refill(dropped, per_entry, base_s, budget.hours, matched_s)
    return {
        "rule": budget.model_dump(mode="json"),
        "pilot": {
            "cell": pilot["cell"],
            "train_seconds": round(pilot["train_seconds"], 1),
            "eval_seconds_per_item": round(item_s, 3),
            "n_eval": pilot["n_eval"],
        },
        "n_test": n_test,
        "n_validation": n_val,
        "estimate_seconds": {k: round(v, 1) for k, v in per_entry.items()},
        "estimate_hours": {k: round(v / 3600, 2) for k, v in per_entry.items()},
        "base_hours": round(base_s / 3600, 2),
        "total_hours": round((base_s + sum(per_entry.values())) / 3600, 2),
        "dropped": dropped,
        "kept_hours": round(remaining_seconds(per_entry, base_s, dropped, matched_s) / 3600, 2),
    }
