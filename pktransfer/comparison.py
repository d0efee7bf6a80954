"""`pkt compare`: a grid of methods x seeds on one pair and task, at one training budget, with statistics.

1. Plan: every entry of ``recipe.compare.methods`` (expanded over its ``sweep``) x every seed becomes a
   cell, a full recipe whose only differences are the method, the entry's overrides and the seed. Entries
   may not touch the pair, task or evaluation, and may change the training budget (steps, batch, lr
   schedule, LoRA rank, ...) only with ``allow_unequal_budget``. Every cell is validated before any
   work starts.
2. Shared work is done once: the untouched teacher and student are evaluated once (greedy decoding does
   not depend on the seed) in ``base/``; Seeking's teacher sensitivity is extracted once per distinct
   setting in ``shared/``; KD's teacher logits are cached in ``shared/kd-logits`` by the first KD cell.
3. Cells run seed by seed, each a normal run folder (``cells/LABEL/seed-N``). A finished cell is never
   rerun; an interrupted one resumes from its last checkpoint; a finished cell whose recipe differs
   from the plan is refused (stale results).
4. Results: per label and metric the mean, std and 95% t-interval over seeds; per label the paired
   difference to the baseline label with a paired t-test across seeds; costs; loss curves. Written as
   compare.json / compare.csv / compare.md and two PNG plots.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pktransfer.errors import OutputError, PktError, RecipeError
from pktransfer.fileio import write_text
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
from pktransfer.progress import Progress
from pktransfer.recipe import BUDGET_KEYS, FIXED_KEYS, Recipe, TuneSpec, apply_overrides, recipe_from_dict, save_recipe
from pktransfer.runs import check_matches, check_output_location, check_replaceable, read_marker, result_fields, write_marker

# ---- 1. plan ----------------------------------------------------------------------------------------


@dataclass
class Cell:
    label: str
    seed: int
    recipe: Recipe
    folder: Path


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def expand_entries(recipe: Recipe) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, method mapping, overrides) for every entry and sweep combination, labels unique."""
    return [(label, method, overrides) for label, method, overrides, _ in expand_entries_tuned(recipe)]


def expand_entries_tuned(recipe: Recipe) -> list[tuple[str, dict[str, Any], dict[str, Any], TuneSpec | None]]:
    """(label, method mapping, overrides, tuning or None) for every entry and sweep combination, labels unique."""
    assert recipe.compare is not None
    out = []
    for entry in recipe.compare.methods:
        tune = recipe.compare.tune if entry.tune is None else (entry.tune or None)
        method = entry.method.model_dump(mode="json")
        base_label = entry.label or entry.method.label()
        keys = list(entry.sweep)
        for combo in itertools.product(*(entry.sweep[k] for k in keys)) if keys else [()]:
            overrides = dict(entry.overrides)
            overrides.update(zip(keys, combo, strict=True))
            label = base_label
            if keys:
                label += "[" + ",".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in zip(keys, combo, strict=True)) + "]"
            out.append((label, method, overrides, tune))
    labels = [lbl for lbl, _, _, _ in out]
    dupes = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
    if dupes:
        raise RecipeError(
            f"compare.methods: the label(s) {dupes} occur more than once",
            hint="give entries of the same method distinct 'label' values",
        )
    return out


def check_overrides(label: str, overrides: dict[str, Any], allow_unequal_budget: bool) -> None:
    for key in overrides:
        top = key.split(".", 1)[0]
        if top in FIXED_KEYS:
            raise RecipeError(
                f"compare entry '{label}' overrides '{key}': the pair, task, evaluation, seeds and "
                "output folder are the same for every cell of a comparison",
                hint="change it in the recipe itself (for all methods), or run a separate comparison",
            )
        if key == "method" or key == "method.name":
            raise RecipeError(
                f"compare entry '{label}' overrides '{key}'",
                hint="make it an entry of its own: methods: [lora, {name: kd, alpha: 0.5}]",
            )
        if any(key == b or key.startswith(b + ".") or b.startswith(key + ".") for b in BUDGET_KEYS) and not allow_unequal_budget:
            raise RecipeError(
                f"compare entry '{label}' changes the training budget ('{key}'); every method "
                "must train with the same samples, steps, batch, lr schedule and LoRA size",
                hint="remove the override, or set compare.allow_unequal_budget: true (the report then says the budgets differ)",
            )


def plan_matched(recipe: Recipe, chosen: dict[str, dict[str, Any]]) -> list[Cell]:
    """For each ``compare.matched`` pair (A, B) whose tuned values differ: A at B's chosen values and B at A's, on
    every seed, labelled ``A[key=value]``, so the contrast can be made at each tuned setting, both ways."""
    assert recipe.compare is not None
    entries = {label: (method, overrides) for label, method, overrides in expand_entries(recipe)}
    for a, b in recipe.compare.matched:
        missing = [x for x in (a, b) if x not in entries]
        if missing:
            raise RecipeError(f"compare.matched names {missing}, not entries of the grid", hint=f"entries: {', '.join(entries)}")
    base = recipe.dump()
    base.pop("compare")
    base["evaluation"].update(teacher=False, student=False)
    root = Path(recipe.output_dir)
    cells = []
    for seed in recipe.compare.seeds:
        for a, b in recipe.compare.matched:
            for x, y in ((a, b), (b, a)):
                mine, theirs = chosen.get(x, {}), chosen.get(y, {})
                if not theirs or theirs == mine:
                    continue
                label = f"{x}[" + ",".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in theirs.items()) + "]"
                method, overrides = entries[x]
                folder = root / "cells" / label / f"seed-{seed}"
                what = f"compare.matched {x} at {y}'s settings"
                cells.append(_cell(base, label, method, seed, folder, {**overrides, **theirs}, what))
    return cells


def plan_grid(recipe: Recipe, chosen: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
    """Every cell's full recipe, seed-major (all methods of the first seed first); ``chosen`` (label ->
    {key: value}) adds each tuned entry's chosen value."""
    if recipe.compare is None:
        raise RecipeError(
            "the recipe has no 'compare' section",
            hint="add compare: {methods: [lora, pissa, kd], seeds: [0, 1]} (see recipes/quick-compare.yaml)",
        )
    spec = recipe.compare
    root = Path(recipe.output_dir)
    base = recipe.dump()
    base.pop("compare")
    base["evaluation"].update(teacher=False, student=False)  # evaluated once in base/
    entries = expand_entries(recipe)
    for label, _, overrides in entries:
        check_overrides(label, overrides, spec.allow_unequal_budget)
    unknown = sorted({x for pair in spec.matched for x in pair} - {lbl for lbl, _, _ in entries})
    if unknown:
        raise RecipeError(
            f"compare.matched names {unknown}, not entries of the grid", hint=f"entries: {[lbl for lbl, _, _ in entries]}"
        )
    if spec.baseline not in [lbl for lbl, _, _ in entries]:
        raise RecipeError(
            f"compare.baseline '{spec.baseline}' is not one of the labels {[lbl for lbl, _, _ in entries]}",
            hint="name an entry's label, e.g. baseline: lora",
        )
    if len(set(spec.seeds)) != len(spec.seeds):
        raise RecipeError(f"compare.seeds {spec.seeds} repeats a seed", hint="list each seed once")
    cells = []
    for seed in spec.seeds:
        for label, method, overrides in entries:
            folder = root / "cells" / label / f"seed-{seed}"
            every = {**overrides, **(chosen or {}).get(label, {})}
            cells.append(_cell(base, label, method, seed, folder, every, f"compare entry '{label}'"))
    return cells


def _cell(
    base: dict[str, Any], label: str, method: dict[str, Any], seed: int, folder: Path, overrides: dict[str, Any], what: str
) -> Cell:
    """One cell: the shared recipe with this entry's method, seed, folder and overrides, validated."""
    data = json.loads(json.dumps(base))
    data["method"] = dict(method)
    data["seed"] = seed
    data["output_dir"] = str(folder)
    data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    return Cell(label, seed, recipe_from_dict(data, what), folder)


# ---- 1b. tuning on validation -------------------------------------------------------------------------


@dataclass
class TuneCell:
    label: str
    key: str
    index: int
    value: Any
    cell: Cell


def plan_tuning(recipe: Recipe) -> list[TuneCell]:
    """One validation-only cell per tuned entry and candidate value, on the tuning seed. Never reads test:
    the cells evaluate ``validation`` only, and the untouched models are not evaluated here."""
    assert recipe.compare is not None
    tuned = [(lbl, m, o, t) for lbl, m, o, t in expand_entries_tuned(recipe) if t is not None]
    if not tuned:
        return []
    if not recipe.task.validation:
        raise RecipeError(
            "compare: tuning needs validation items, and task.validation is not set",
            hint="set task.validation: N (e.g. 64; carved from the train split when the task has no validation split)",
        )
    base = recipe.dump()
    base.pop("compare")
    base["evaluation"].update(teacher=False, student=False, splits=["validation"])
    root = Path(recipe.output_dir)
    out = []
    for label, method, overrides, tune in tuned:
        if tune.key in overrides:
            raise RecipeError(
                f"compare entry '{label}' both sets and tunes '{tune.key}'", hint="drop one of the two (overrides or tune)"
            )
        check_overrides(label, overrides, recipe.compare.allow_unequal_budget)
        seed = recipe.compare.seeds[0] if tune.seed is None else tune.seed
        for i, value in enumerate(tune.values):
            folder = root / "tune" / label / f"value-{i}"
            what = f"compare entry '{label}', {tune.key} = {value}"
            cell = _cell(base, label, method, seed, folder, {**overrides, tune.key: value}, what)
            out.append(TuneCell(label, tune.key, i, value, cell))
    return out


def choose(tuning: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label, the value with the highest validation accuracy; ties: the value listed first."""
    chosen: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(t["label"] for t in tuning):
        rows = sorted((t for t in tuning if t["label"] == label), key=lambda t: t["index"])
        best = max(rows, key=lambda t: (t["validation"], -t["index"]))
        chosen[label] = {best["key"]: best["value"]}
    return chosen


# ---- 1c. the budget rule: one pilot cell, an estimate, entries cut by the recipe's declared order -------------


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


def _grid_counts(recipe: Recipe) -> tuple[dict[str, tuple[int, int]], dict[tuple[str, str], int]]:
    """label -> (tuning cells, grid cells), and (label, partner) -> the label's matched cells at the partner's settings
    (one per seed: the tuned values are not known before the grid, so the estimate assumes they differ)."""
    assert recipe.compare is not None
    spec = recipe.compare
    counts = {label: (len(tune.values) if tune else 0, len(spec.seeds)) for label, _, _, tune in expand_entries_tuned(recipe)}
    matched = {(x, y): len(spec.seeds) for a, b in spec.matched for x, y in ((a, b), (b, a))}
    return counts, matched


def without_entries(recipe: Recipe, dropped: list[str]) -> Recipe:
    """The recipe with the entries labelled ``dropped`` (and matched pairs naming them) removed."""
    assert recipe.compare is not None
    keep = [e for e in recipe.compare.methods if (e.label or e.method.label()) not in dropped]
    matched = [p for p in recipe.compare.matched if not set(p) & set(dropped)]
    return recipe.model_copy(update={"compare": recipe.compare.model_copy(update={"methods": keep, "matched": matched})})


def apply_budget(
    recipe: Recipe, root: Path, records_dir: Path | None, progress: Progress, record: Callable[[Path], None]
) -> tuple[Recipe, dict[str, Any]]:
    """Run the pilot cell (once), estimate the grid, apply ``compare.budget``'s cut order; the decision is kept in
    ``budget.json`` and never re-made. Returns the recipe without the dropped entries and the decision."""
    from pktransfer import pipeline
    from pktransfer.data import get_task
    from pktransfer.memory import release_memory

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
    path = root / "budget.json"
    if not path.is_file() and records_dir is not None and (records_dir / "budget.json").is_file():
        shutil.copy2(records_dir / "budget.json", path)
    if path.is_file():
        decision = json.loads(path.read_text())
    else:
        tune_cells = [tc.cell for tc in plan_tuning(recipe) if tc.label == spec.baseline]
        pilot = tune_cells[0] if tune_cells else next(c for c in plan_grid(recipe) if c.label == spec.baseline)
        where = pilot.folder.resolve().relative_to(root).as_posix()
        what = f"pilot: {pilot.label}, seed {pilot.seed} ({where}), to estimate the grid's cost"

        def job() -> None:
            pipeline.run(pilot.recipe, progress=progress, cache_dir=root / "shared")
            release_memory()

        run_claimed([(pilot.folder, what, job)], progress)
        record(pilot.folder)
        run = json.loads((pilot.folder / "run.json").read_text())
        stages = run["stages"]
        train_s = sum(v["seconds"] for k, v in stages.items() if not k.startswith("eval"))
        n_eval = sum(m["n"] for m in run["metrics"]["trained"].values())
        eval_s = sum(v["seconds"] for k, v in stages.items() if k.startswith("eval"))
        task = get_task(recipe.task.name, recipe.task.params, recipe.task.data_dir)
        n_test = len(pipeline._eval_items(task, "test", recipe))
        n_val = len(pipeline._eval_items(task, "validation", recipe)) if recipe.task.validation else 0
        counts, matched_cells = _grid_counts(recipe)
        per_entry, base_s, matched_s = estimate_grid(
            counts,
            matched=matched_cells,
            train_seconds=train_s,
            item_seconds=eval_s / max(n_eval, 1),
            n_validation=n_val,
            n_test=n_test,
            factors=budget.cost_factors,
            teacher_eval_factor=budget.teacher_eval_factor,
        )
        dropped = cut_to_budget(per_entry, base_s, budget.hours, budget.cut_order, matched_s)
        decision = {
            "rule": budget.model_dump(mode="json"),
            "pilot": {
                "cell": where,
                "train_seconds": round(train_s, 1),
                "eval_seconds_per_item": round(eval_s / max(n_eval, 1), 3),
                "n_eval": n_eval,
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


# ---- 2. shared work ---------------------------------------------------------------------------------


def attach_shared_work(cells: list[Cell], root: Path) -> list[tuple[str, Recipe, str, list[Cell]]]:
    """Let each cell's method point it at caches shared across the grid; return the jobs to run once first
    (folder, recipe, verb, the cells that need it), each folder once."""
    jobs: dict[str, tuple[Recipe, str, list[Cell]]] = {}
    for cell in cells:
        shared = registry.method_class(cell.recipe.method.name).shared_work(cell.recipe, root / "shared")
        cell.recipe = shared.recipe
        for folder, recipe, verb in shared.jobs:
            jobs.setdefault(folder, (recipe, verb, []))[2].append(cell)
    return [(folder, recipe, verb, needed) for folder, (recipe, verb, needed) in jobs.items()]


# ---- 4. statistics (pure) ---------------------------------------------------------------------------


# ---- collecting ---------------------------------------------------------------------------------------


def cell_record(cell: Cell) -> dict[str, Any]:
    run = json.loads((cell.folder / "run.json").read_text())
    history_path = cell.folder / "checkpoints" / "log_history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    stages = run.get("stages", {})
    earlier = resumed_cost(run)
    before = earlier["train_seconds"] if earlier.get("cost_kept") else 0.0
    record = {
        "label": cell.label,
        "seed": cell.seed,
        "method": run["recipe"]["method"]["name"],
        "folder": str(cell.folder),
        "metrics": {split: m["accuracy"] for split, m in run["metrics"].get("trained", {}).items()},
        "items": {split: item_scores(cell.folder, run, split) for split in run["metrics"].get("trained", {})},
        "n_eval": {split: m["n"] for split, m in run["metrics"].get("trained", {}).items()},
        "steps": run["training"]["steps"],
        "final_loss": run["training"]["final_loss"],
        # a resumed cell: its last attempt plus the earlier attempts' training up to the checkpoint (the ledger);
        # a method that trains inside its preparation (LaTen) has no train stage
        "prepare_seconds": stages.get("prepare", {}).get("seconds", 0.0) + (0.0 if "train" in stages else before),
        "train_seconds": stages.get("train", {}).get("seconds", 0.0) + (before if "train" in stages else 0.0),
        "wall_seconds": run["wall_seconds"] + before,
        "resumed": earlier or None,
        "cost_partial": None
        if not earlier or earlier.get("cost_kept")
        else f"resumed at step {earlier['step']} of {run['training']['steps']} before pktransfer kept a cost ledger: its "
        "time and teacher work count the last attempt only",
        "peak_rss_anon_gib": max((s.get("peak_rss_anon_gib", 0.0) for s in stages.values()), default=0.0),
        "peak_cuda_gib": max((s.get("peak_cuda_gib", 0.0) for s in stages.values()), default=0.0),
        "loss_curve": [(h["step"], h["loss"]) for h in history if "loss" in h]
        # fewer steps than training.logging_steps: only the trainer's closing mean loss exists
        or [(h["step"], h["train_loss"]) for h in history if "train_loss" in h],
        "budget": {k: run["recipe"][k.split(".")[0]][k.split(".")[1]] for k in BUDGET_KEYS},
        "spent": {k: run.get("budget", {}).get(k) for k in SPENT_KEYS},
        "teacher": run.get("budget", {}).get("teacher", {}),
        "learning_curve": run["training"].get("learning_curve", []),
    }
    # multiple choice: how often the trained student predicts each letter (absent for other tasks, so the records
    # and reports of generation grids stay as they were)
    predicted = {split: m["predicted"] for split, m in run["metrics"].get("trained", {}).items() if m.get("predicted")}
    if predicted:
        record["predicted"] = predicted
    return record


def tuning_row(tc: TuneCell, cell: Cell) -> dict[str, Any]:
    """A finished tuning cell's line of the report (``cell``: where it lies, the grid's folder or a record)."""
    rec = cell_record(cell)
    return {
        "label": tc.label,
        "key": tc.key,
        "index": tc.index,
        "value": tc.value,
        "validation": rec["metrics"]["validation"],
        "n_validation": rec["n_eval"]["validation"],
        "seed": tc.cell.seed,
        "final_loss": rec["final_loss"],
        "wall_seconds": rec["wall_seconds"],
        "teacher": rec["teacher"],
        "resumed": rec["resumed"],
        "cost_partial": rec["cost_partial"],
    }


def resumed_cost(run: dict[str, Any]) -> dict[str, Any]:
    """A run.json's ``training.earlier_attempts`` (empty for a run trained in one go). Runs resumed before the ledger
    existed recorded only ``resumed_from``: their checkpoint's step is read from its name, ``cost_kept`` False."""
    training = run.get("training", {})
    if training.get("earlier_attempts"):
        return training["earlier_attempts"]
    resumed = training.get("resumed_from")
    if not resumed:
        return {}
    step = Path(resumed).name.rsplit("-", 1)[-1]
    return {"step": int(step) if step.isdigit() else step, "cost_kept": False}


SPENT_KEYS = (
    "trainable_parameters",
    "optimizer_steps",
    "training_tokens",
    "student_generated_tokens",
    "student_generation_seconds",
    "on_policy_batches",
)
# what "equal budget" compares; the rest of SPENT_KEYS is extra student compute (on-policy sampling), shown as cost
EQUAL_BUDGET_KEYS = SPENT_KEYS[:3]


def item_scores(folder: Path, run: dict[str, Any], split: str) -> dict[str, float]:
    """Item id -> 1.0 / 0.0 (correct) of the trained model's evaluation on ``split`` (for the paired bootstrap)."""
    task = run["recipe"]["task"]["name"]
    path = folder / "eval" / f"trained.{task}.{split}.items.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["id"]): float(bool(r["correct"])) for r in rows}


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
        if margin is not None:
            b["equivalence"] = equivalent(dist, margin, alpha)
    return {
        "comparisons": m,
        "alpha": alpha,
        "adjustment": adjustment,
        "simultaneous_level": 1 - alpha / m if m else None,
        "margin": margin,
    }


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
        entry: dict[str, Any] = {
            "method": rs[0]["method"],
            "seeds": [r["seed"] for r in rs],
            "metrics": {},
            "paired_vs_baseline": {},
        }
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
        entry["cost"] = {
            k: describe([float(r[k]) for r in rs])["mean"] for k in ("prepare_seconds", "train_seconds", "wall_seconds")
        }
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
        by_label[label] = entry
    family = {}
    for metric in metrics:
        primary = {lbl: e for lbl, e in by_label.items() if lbl not in (secondary or set())}
        family[metric] = adjust_family(primary, distributions, metric, alpha=alpha, adjustment=adjustment, margin=margin)
    differences = budget_differences(records)
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
    return {
        "design_mde": design,
        "family": family,
        "labels": labels,
        "metrics": metrics,
        "baseline": baseline,
        "by_label": by_label,
        "equal_budget": not differences,
        "budget_differences": differences,
    }


# ---- the grid ---------------------------------------------------------------------------------------


@dataclass
class SharedWork:
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


def build_result(
    recipe: Recipe,
    records: list[dict[str, Any]],
    *,
    secondary: list[str],
    tuning: list[dict[str, Any]],
    chosen: dict[str, dict[str, Any]],
    base_info: dict[str, Any] | None,
    shared: SharedWork,
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


@dataclass
class CompareResult:
    output_dir: Path
    result: dict[str, Any]


def _finished(folder: Path) -> bool:
    return (folder / "run.json").is_file()


def run_claimed(
    jobs: list[tuple[Path, str, Callable[[], Any]]],
    progress: Progress,
    poll: float | None = None,
    *,
    keep_going: bool = False,
) -> None:
    """Run every job ``(folder, what, fn)`` whose folder is unfinished, each under its folder's claim
    (``pktransfer.claims``): a job another worker holds is skipped and waited for once the rest are done, so several
    workers (terminals, machines on a shared filesystem, a job array, ``--workers``) share one grid and each job runs
    exactly once. A job whose owner died is taken over (its claim goes stale) and resumes from its checkpoint.
    ``what`` is logged when this worker starts the job. Returns when every job is finished.

    ``keep_going``: a job that fails (an error, not a stop signal) is reported and left unfinished, and the others
    still run (a grid left overnight does not stop at its first broken cell); then one error names every failed
    job."""
    from pktransfer.claims import Claim, ClaimBusy

    poll = float(os.environ.get("PKT_WORKER_POLL_SECONDS", "2")) if poll is None else poll
    pending = list(jobs)
    announced: set[str] = set()
    failed: list[tuple[str, str]] = []
    while pending:
        waiting = []
        for folder, what, fn in pending:
            if _finished(folder):
                continue
            try:
                claim = Claim(folder, "output folder").acquire()  # the run inside claims it again (same process)
            except ClaimBusy as err:
                if what not in announced:
                    progress.log(f"compare: {what} is being run by another worker ({err.owner.describe()})")
                    announced.add(what)
                waiting.append((folder, what, fn))
                continue
            try:
                if not _finished(folder):  # finished by another worker between the check and the claim
                    progress.log(f"compare: {what}")
                    fn()
            except Exception as err:
                if not keep_going:
                    raise
                reason = (f"{type(err).__name__}: {err}" if str(err) else type(err).__name__).splitlines()[0][:300]
                failed.append((what, reason))
                progress.warn(f"compare: {what} failed ({reason}); the other cells go on")
            finally:
                claim.release()
        pending = [j for j in waiting if not _finished(j[0])]
        if pending:
            time.sleep(poll)
    if failed:
        raise PktError(
            f"{len(failed)} job(s) of the grid failed: " + "; ".join(f"{what}: {reason}" for what, reason in failed),
            hint="a failed cell's OUTPUT.partial/FAILED.json says why; fix the cause and rerun the same command: "
            "finished cells are kept and the failed ones start again or resume from their checkpoint",
        )


def _reusable(folder: Path, recipe: Recipe, what: str) -> bool:
    """A finished folder of the grid: reusable only when made with the same recipe (else a clear error)."""
    if not _finished(folder):
        return False
    check_matches(folder, result_fields(recipe.dump()), what)
    return True


# ---- 5b. records: a grid's results without its weights, to carry a long study across machines --------------

# what a finished folder's result is (its weights, checkpoints and caches are not: they can be rebuilt)
RECORD_FILES = ("run.json", "recipe.yaml", "report.md", "checkpoints/log_history.json")
ORIGIN = "record.json"  # in each record: the grid folder it was made in (paths into it are relocated on restore)


def _relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path inside folder ``old`` moved to the same place inside ``new``."""
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value


def relocate_record(folder: Path, old: str, new: str) -> None:
    """A record made in grid folder ``old``, restored into ``new``: the paths its recipe holds into the old grid
    (shared caches: KD's logits, SemAlign's targets, Seeking's sensitivity) are moved to the new grid, so the
    grid's recipe check sees the recipe it would write there; the marker's hash is that of the moved recipe."""
    import yaml

    from pktransfer.fileio import write_json
    from pktransfer.runs import MARKER, recipe_sha256

    marker = json.loads((folder / MARKER).read_text())
    if marker.get("recipe") is not None:
        marker["recipe"] = _relocate(marker["recipe"], old, new)
        marker["recipe_sha256"] = recipe_sha256(marker["recipe"])
        write_json(folder / MARKER, marker)
    if (folder / "run.json").is_file():
        write_json(folder / "run.json", _relocate(json.loads((folder / "run.json").read_text()), old, new))
    if (folder / "recipe.yaml").is_file():
        moved = _relocate(yaml.safe_load((folder / "recipe.yaml").read_text()), old, new)
        write_text(folder / "recipe.yaml", yaml.safe_dump(moved, sort_keys=False, allow_unicode=True))


REPORT_FILES = (
    "compare.md",
    "compare.csv",
    "compare.json",
    "compare_scores.png",
    "compare_loss.png",
    "constraints.txt",
    "budget.json",
)

# packages whose versions change what a cell computes (run.json's ``versions``), pinned in a grid's constraints.txt
PINNED = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "scipy")


def grid_constraints(runs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """A pip constraints file pinning the versions the grid's cells ran with (from each run.json), and the packages
    whose versions differ between cells (then the most common version is pinned and the file says so)."""
    from collections import Counter

    lines = [
        "# the package versions this comparison's cells ran with (written by pkt compare from each run.json);",
        "# reproduce with: pip install -c constraints.txt -c THIS_FILE '.[offline]'   (torch: the CPU build, +cpu)",
    ]
    mixed = []
    for pkg in PINNED:
        seen = Counter(r.get("versions", {}).get(pkg) for r in runs)
        seen.pop(None, None)
        seen.pop("not installed", None)
        if not seen:
            continue
        version, _ = seen.most_common(1)[0]
        if len(seen) > 1:
            mixed.append(f"{pkg}: " + ", ".join(f"{v} ({n} cells)" for v, n in seen.most_common()))
            lines.append(f"# {pkg}: cells ran with {', '.join(seen)}; the most common is pinned")
        lines.append(f"{pkg}=={version.split('+', 1)[0]}")
    return "\n".join(lines) + "\n", mixed


RERUNS = "reruns.json"  # in a record: the earlier finished results of the same folder it replaced


def rerun_history(dest: Path) -> list[dict[str, Any]]:
    """The earlier finished results recorded at ``dest`` (empty when nothing was recorded there): what a record
    replacing it must keep, so a report can say an entry was rerun after its results existed."""
    if not (dest / "run.json").is_file():
        return []
    old = json.loads((dest / "run.json").read_text())
    earlier = json.loads((dest / RERUNS).read_text()) if (dest / RERUNS).is_file() else []
    return [
        *earlier,
        {
            "started_at": old.get("started_at"),
            "wall_seconds": old.get("wall_seconds"),
            "metrics": {split: m.get("accuracy") for split, m in old.get("metrics", {}).get("trained", {}).items()},
        },
    ]


def same_run(recorded: Path, current: Path) -> bool:
    """Whether two run.json files are one run: byte for byte, or the same start and wall time (a record restored
    into another grid folder has its paths moved, ``relocate_record``, and is not a rerun)."""
    if recorded.read_bytes() == current.read_bytes():
        return True
    a, b = json.loads(recorded.read_text()), json.loads(current.read_text())
    return a.get("started_at") is not None and (a.get("started_at"), a.get("wall_seconds")) == (
        b.get("started_at"),
        b.get("wall_seconds"),
    )


def save_record(folder: Path, root: Path, records: Path) -> None:
    """Copy a finished folder's record (marker, run.json, recipe, per-item evaluations, loss history) to the
    same place under ``records``; written to a temporary folder, then renamed into place."""
    import tempfile

    from pktransfer.fileio import honour_umask, write_json
    from pktransfer.runs import MARKER

    dest = records / folder.relative_to(root)
    if (dest / "run.json").is_file() and same_run(dest / "run.json", folder / "run.json"):
        return  # already recorded (or restored from this record, perhaps into another grid folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: two workers may record the same finished folder at once
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    for rel in (MARKER, *RECORD_FILES, *(str(f.relative_to(folder)) for f in sorted((folder / "eval").glob("*")))):
        if (folder / rel).is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, tmp / rel)
    write_json(tmp / ORIGIN, {"grid": str(root)})
    history = rerun_history(dest)
    if history:  # this folder was run again after a finished result had been recorded: the record keeps saying so
        write_json(tmp / RERUNS, history)
    honour_umask(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:  # another worker recorded it in between: the same finished folder, so the same record
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "run.json").is_file():
            raise


def recorded_reruns(records_dir: Path | None, root: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """Cells whose record replaced an earlier finished result: label, seed, folder and the earlier results."""
    if records_dir is None:
        return []
    out = []
    for c in cells:
        rel = c.folder.resolve().relative_to(root)
        if (records_dir / rel / RERUNS).is_file():
            earlier = json.loads((records_dir / rel / RERUNS).read_text())
            out.append({"label": c.label, "seed": c.seed, "folder": str(rel), "earlier": earlier})
    return out


def restore_records(records: Path, root: Path, progress: Progress) -> int:
    """Put every finished record under ``records`` back into the grid where that folder is missing, relocated
    from the grid folder it was made in (``relocate_record``); the grid's usual check then refuses any record
    made with another recipe. Shared work is not restored (its record holds its cost, not its caches). Returns
    how many were restored."""
    import tempfile

    from pktransfer.fileio import honour_umask
    from pktransfer.runs import MARKER

    n = 0
    for run in sorted(records.glob("**/run.json")):
        src = run.parent
        if src == records or not (src / MARKER).is_file() or src.name.endswith(".partial"):
            continue
        if src.relative_to(records).parts[0] == "shared":
            continue
        dest = root / src.relative_to(records)
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".restoring", dir=dest.parent))
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        origin = json.loads((src / ORIGIN).read_text())["grid"] if (src / ORIGIN).is_file() else str(root)
        if origin != str(root):
            relocate_record(tmp, origin, str(root))
        honour_umask(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another worker restored it in between
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        n += 1
    if n:
        progress.log(f"compare: restored {n} finished folders from the records in {records}")
    return n


def compare(
    recipe: Recipe,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    records: str | Path | None = None,
) -> CompareResult:
    """Run (or resume) the recipe's comparison grid and write the comparison report.

    ``records``: a folder mirroring each finished folder's result without its weights (``save_record``); the
    grid resumes from it on another machine, and the report is copied there too."""
    from pktransfer import pipeline
    from pktransfer.memory import release_memory
    from pktransfer.reports import plot_compare, render_compare_csv, render_compare_markdown

    progress = progress or Progress(quiet=quiet)
    tune_cells = plan_tuning(recipe)
    untuned = plan_grid(recipe)  # every entry is checked before any work
    root = Path(recipe.output_dir).expanduser().resolve()
    check_output_location(root)
    check_replaceable(root, "comparison folder")  # refuse a folder pktransfer did not write, before any work
    for c in [*untuned, *(tc.cell for tc in tune_cells)]:  # everything checkable before any model is loaded
        pipeline.check_recipe(c.recipe)
    if overwrite and root.exists():
        shutil.rmtree(root)  # checked above: empty, or a comparison pktransfer wrote
    if not root.exists() or read_marker(root) is None:
        root.mkdir(parents=True, exist_ok=True)
        write_marker(root, "compare", result_fields(recipe.dump(), ("output_dir",)))
    save_recipe(recipe, root / "compare.yaml")
    records_dir = Path(records).expanduser().resolve() if records is not None else None
    if records_dir is not None:
        records_dir.mkdir(parents=True, exist_ok=True)
        if not overwrite:  # --overwrite starts afresh; the records are then replaced cell by cell
            restore_records(records_dir, root, progress)

    def record(folder: Path) -> None:
        if records_dir is not None:
            save_record(Path(folder).resolve(), root, records_dir)

    budget = None
    if recipe.compare is not None and recipe.compare.budget is not None:
        recipe, budget = apply_budget(recipe, root, records_dir, progress, record)
        tune_cells, untuned = plan_tuning(recipe), plan_grid(recipe)

    started = time.time()
    shared_ledger = SharedWork()

    def shared_work(cs: list[Cell]) -> None:
        jobs = []
        shared = attach_shared_work(cs, root)
        for folder, r, verb, needed in shared:
            # a shared folder's name is the hash of everything its work depends on (the teacher, the data, the
            # method's own settings), so a finished one serves every cell that asks for it: a tuning cell at one
            # learning rate and the grid's cells at another. It is not run when every cell needing it is finished.
            if not _finished(Path(folder)) and not all(_finished(c.folder) for c in needed):

                def job(r: Recipe = r, verb: str = verb) -> None:
                    pipeline.run_verb(r, verb, progress=progress)
                    release_memory()

                jobs.append((Path(folder), f"running `{verb}` once for the cells of '{r.method.name}' ({folder})", job))
        run_claimed(jobs, progress)  # other workers wait for shared work another one is doing
        for folder, _, _, needed in shared:
            run_json: Path | None = Path(folder) / "run.json"
            if _finished(Path(folder)):
                record(Path(folder))  # its run.json (the cost), not its caches
            else:
                run_json = records_dir / Path(folder).relative_to(root) / "run.json" if records_dir else None
            shared_ledger.note(folder, needed, run_json)

    # 1b. tuning: validation only, one seed; the test split is not read until every value is chosen
    tuning: list[dict[str, Any]] = []
    if tune_cells:
        shared_work([tc.cell for tc in tune_cells])
        for tc in tune_cells:
            _reusable(tc.cell.folder, tc.cell.recipe, f"finished tuning cell {tc.label} ({tc.key} = {tc.value})")
        tuning_jobs = []
        for i, tc in enumerate(tune_cells, 1):

            def tune(tc: TuneCell = tc) -> None:
                pipeline.run(tc.cell.recipe, progress=progress, cache_dir=root / "shared")
                release_memory()
                record(tc.cell.folder)

            what = f"tuning {i}/{len(tune_cells)}: {tc.label}, {tc.key} = {tc.value} (validation)"
            tuning_jobs.append((tc.cell.folder, what, tune))
        # every tuning cell is finished (by this worker or another) before any test evaluation starts
        run_claimed(tuning_jobs, progress, keep_going=True)
        for tc in tune_cells:
            record(tc.cell.folder)
            tuning.append(tuning_row(tc, tc.cell))
    chosen = choose(tuning)
    for label, kv in chosen.items():
        progress.log(f"compare: {label}: chose {', '.join(f'{k} = {v}' for k, v in kv.items())} on validation")
    cells, matched = untuned, []
    if chosen:  # the untuned cells were checked before any work; the chosen values are checked now
        matched = plan_matched(recipe, chosen)
        cells = plan_grid(recipe, chosen) + matched
        for cell in cells:
            pipeline.check_recipe(cell.recipe)
    secondary = sorted({c.label for c in matched})
    shared_work(cells)
    for c in cells:  # a finished cell made with another recipe is refused, never silently reused
        _reusable(c.folder, c.recipe, f"finished cell {c.label} (seed {c.seed})")
    # the untouched models' evaluation is one more job beside the cells (the report needs it, no cell does)
    jobs: list[tuple[Path, str, Callable[[], Any]]] = []
    base_dir = root / "base"
    base_recipe = recipe.model_copy(update={"output_dir": str(base_dir), "compare": None})
    wants_base = recipe.evaluation.teacher or recipe.evaluation.student
    if wants_base and not _reusable(base_dir, base_recipe, "the untouched models' evaluation (base/)"):

        def base() -> None:
            pipeline.evaluate_pair(base_recipe, progress=progress)
            release_memory()
            record(base_dir)  # at once, like a cell: a grid resumed elsewhere from its records does not redo it

        jobs.append((base_dir, "evaluating the untouched teacher and student once", base))
    elif wants_base:
        record(base_dir)  # finished earlier (by this grid or another worker): recorded now, not only with the report
    todo = [c for c in cells if not _finished(c.folder)]
    progress.log(
        f"compare: {len(cells)} cells ({len(cells) - len(todo)} already finished), "
        f"{len(recipe.compare.methods)} entries x seeds {recipe.compare.seeds}"
    )
    for i, cell in enumerate(cells, 1):
        if _finished(cell.folder):
            continue

        def run_cell(cell: Cell = cell) -> None:
            finished: dict[str, list[float]] = {}
            for c in cells:
                if _finished(c.folder):
                    finished.setdefault(c.label, []).append(json.loads((c.folder / "run.json").read_text())["wall_seconds"])
            pending = [c.label for c in cells if not _finished(c.folder)]
            tuned: dict[str, list[float]] = {}
            for t in tuning:
                tuned.setdefault(t["label"], []).append(t["wall_seconds"])
            left = remaining_seconds_of_cells(pending, finished, tuned)
            if left is not None:
                progress.log(
                    f"compare: about {left / 3600:.1f} h of cells left ({len(pending)} unfinished, this one included; "
                    "each at its entry's mean time over the finished cells, else over its tuning cells)"
                )
            pipeline.run(cell.recipe, progress=progress, cache_dir=root / "shared")
            release_memory()
            record(cell.folder)

        jobs.append((cell.folder, f"cell {i}/{len(cells)}: {cell.label}, seed {cell.seed}", run_cell))
    run_claimed(jobs, progress, keep_going=True)  # the report needs every cell, whichever worker ran it
    base_info = None
    if wants_base:
        record(base_dir)
        base_info = json.loads((base_dir / "run.json").read_text())
    for c in cells:
        record(c.folder)
    records = [cell_record(c) for c in cells]
    result = build_result(
        recipe,
        records,
        secondary=secondary,
        tuning=tuning,
        chosen=chosen,
        base_info=base_info,
        shared=shared_ledger,
        reruns=recorded_reruns(records_dir, root, [*(tc.cell for tc in tune_cells), *cells]),
        budget=budget,
    )
    result["wall_seconds_this_invocation"] = round(time.time() - started, 1)
    write_text(root / "compare.json", json.dumps(result, indent=1))
    write_text(root / "compare.csv", render_compare_csv(result))
    plots = plot_compare(result, root)
    result["plots"] = [p.name for p in plots]
    write_text(root / "compare.md", render_compare_markdown(result))
    runs = [json.loads((c.folder / "run.json").read_text()) for c in cells]
    constraints, mixed = grid_constraints(runs)
    write_text(root / "constraints.txt", constraints)
    for line in mixed:
        progress.warn(f"compare: the cells ran with different versions of {line} (see constraints.txt)")
    if records_dir is not None:
        for name in REPORT_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, records_dir / name)
    return CompareResult(root, result)


# ---- 6b. the report of a grid still running ------------------------------------------------------------------

INTERIM_FILES = ("compare.interim.md", "compare.interim.json")


def interim_report(recipe: Recipe, *, records: str | Path | None = None) -> CompareResult:
    """The report of the cells finished so far, running nothing: from the grid's folder, or where a folder is
    missing there from ``records`` (a fresh clone of a study). Written as compare.interim.md/.json beside the grid
    (and into ``records``), never as compare.md, with a banner naming every unfinished cell; the statistics pair
    only the seeds an entry and the baseline both have. Needs the grid's tuning finished (its chosen values decide
    the cells) and, with ``compare.budget``, its recorded decision."""
    from pktransfer.reports import render_compare_markdown

    assert recipe.compare is not None
    root = Path(recipe.output_dir).expanduser().resolve()
    records_dir = Path(records).expanduser().resolve() if records is not None else None

    def where(folder: Path) -> Path | None:
        """A finished folder of the grid: in the grid, else in the records; None when neither has it."""
        if _finished(folder):
            return folder
        if records_dir is not None:
            mirrored = records_dir / folder.resolve().relative_to(root)
            if (mirrored / "run.json").is_file():
                return mirrored
        return None

    budget = None
    if recipe.compare.budget is not None:
        found = [d / "budget.json" for d in (root, records_dir) if d is not None and (d / "budget.json").is_file()]
        if not found:
            raise OutputError(
                f"the grid in '{root}' has not decided its budget yet (no budget.json there"
                + (f" or in '{records_dir}')" if records_dir else ")"),
                hint="start the grid with `pkt compare RECIPE` first; the interim report comes after its pilot",
            )
        budget = json.loads(found[0].read_text())
        recipe = without_entries(recipe, budget["dropped"])
    tune_cells = plan_tuning(recipe)
    unfinished_tuning = [tc for tc in tune_cells if where(tc.cell.folder) is None]
    if unfinished_tuning:
        raise OutputError(
            f"{len(unfinished_tuning)} of {len(tune_cells)} tuning cells are unfinished "
            f"({', '.join(f'{tc.label} {tc.key}={tc.value}' for tc in unfinished_tuning[:4])}"
            f"{', ...' if len(unfinished_tuning) > 4 else ''}): the cells of the grid depend on the values tuning chooses",
            hint="let `pkt compare RECIPE` finish its tuning; the interim report covers the test cells",
        )
    tuning = [tuning_row(tc, replace(tc.cell, folder=where(tc.cell.folder))) for tc in tune_cells]
    chosen = choose(tuning)
    matched = plan_matched(recipe, chosen) if chosen else []
    cells = (plan_grid(recipe, chosen) + matched) if chosen else plan_grid(recipe)
    shared_ledger = SharedWork()
    for group in ([tc.cell for tc in tune_cells], cells):
        for folder, _, _, needed in attach_shared_work(group, root):
            found_at = where(Path(folder))
            shared_ledger.note(folder, needed, found_at / "run.json" if found_at is not None else None)
    found = {c.folder: where(c.folder) for c in cells}
    done = [replace(c, folder=f) for c in cells if (f := found[c.folder]) is not None]
    missing = [c for c in cells if found[c.folder] is None]
    if not done:
        raise OutputError(
            f"no test cell of the grid in '{root}' has finished yet", hint="run `pkt compare RECIPE` and try again later"
        )
    base_at = where(root / "base")
    base_info = json.loads((base_at / "run.json").read_text()) if base_at is not None else None
    result = build_result(
        recipe,
        [cell_record(c) for c in done],
        secondary=sorted({c.label for c in matched}),
        tuning=tuning,
        chosen=chosen,
        base_info=base_info,
        shared=shared_ledger,
        reruns=recorded_reruns(records_dir, root, [*(tc.cell for tc in tune_cells), *cells]),
        budget=budget,
    )
    result["interim"] = {
        "finished": len(done),
        "cells": len(cells),
        "unfinished": [{"label": c.label, "seed": c.seed} for c in missing],
        "written_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    outs = [d for d in (root if root.is_dir() else None, records_dir) if d is not None]
    for d in outs:
        write_text(d / "compare.interim.json", json.dumps(result, indent=1))
        write_text(d / "compare.interim.md", render_compare_markdown(result))
    return CompareResult(outs[0] if outs else root, result)


# ---- 7. several workers on one grid ---------------------------------------------------------------------------


def worker_plan(n: int, devices: list[str] | None, cpu_count: int | None = None) -> list[dict[str, str]]:
    """The environment of each of ``n`` worker processes: one device each (``cuda:K`` -> CUDA_VISIBLE_DEVICES=K,
    cycling when there are fewer devices than workers), or CPU workers splitting the cores evenly."""
    if n < 1:
        raise RecipeError(f"--workers {n}: at least one worker", hint="pass --workers 2 or more to share the grid")
    envs = []
    cores = cpu_count or os.cpu_count() or 1
    for i in range(n):
        env = {"PKT_WORKER_INDEX": str(i)}
        device = devices[i % len(devices)] if devices else "cpu"
        if device.startswith("cuda"):
            index = device.split(":", 1)[1] if ":" in device else "0"
            if not index.isdigit():
                raise RecipeError(f"--devices: '{device}' is not cuda:N", hint="e.g. --devices cuda:0,cuda:1")
            env["CUDA_VISIBLE_DEVICES"] = index
        elif device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
            threads = str(max(1, cores // n))
            env.update(OMP_NUM_THREADS=threads, PKT_THREADS=threads)
        else:
            raise RecipeError(f"--devices: unknown device '{device}'", hint="use cpu or cuda:N, e.g. --devices cuda:0,cuda:1")
        envs.append(env)
    return envs


def compare_with_workers(
    recipe_path: str | Path,
    overrides: list[str],
    n: int,
    *,
    devices: list[str] | None = None,
    records: str | Path | None = None,
    progress: Progress | None = None,
) -> CompareResult:
    """Start ``n`` worker processes on the recipe's grid (``pkt compare`` each, sharing it through claims), wait for
    them, then write the report from the finished cells (the same report one process writes). Each worker's output
    goes to ``OUTPUT/workers/worker-K.log``."""
    import subprocess
    import sys

    from pktransfer.recipe import load_recipe

    progress = progress or Progress()
    recipe = load_recipe(recipe_path, overrides)
    plan_tuning(recipe)
    plan_grid(recipe)  # a broken grid fails here, before any process starts
    root = Path(recipe.output_dir).expanduser().resolve()
    check_output_location(root)
    check_replaceable(root, "comparison folder")
    envs = worker_plan(n, devices)
    logs = root / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    if read_marker(root) is None:
        write_marker(root, "compare", result_fields(recipe.dump(), ("output_dir",)))
    cmd = [sys.executable, "-m", "pktransfer.cli", "compare", str(recipe_path)]
    for item in overrides:
        cmd += ["--set", item]
    if records is not None:
        cmd += ["--records", str(records)]
    procs = []
    for i, env in enumerate(envs):
        log = (logs / f"worker-{i}.log").open("a")
        procs.append(
            (
                subprocess.Popen(
                    [*cmd, *(["--threads", env["PKT_THREADS"]] if "PKT_THREADS" in env else [])],
                    env={**os.environ, **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
        progress.log(f"compare: worker {i} started (pid {procs[-1][0].pid}, log {logs / f'worker-{i}.log'})")
    failed = []
    for i, (proc, log) in enumerate(procs):
        rc = proc.wait()
        log.close()
        if rc != 0:
            failed.append(f"worker {i} exited with {rc} (log: {logs / f'worker-{i}.log'})")
    if failed:
        raise OutputError(
            "compare: " + "; ".join(failed),
            hint="read the logs; rerun the same command to resume (finished cells are kept, unfinished ones resume)",
        )
    return compare(recipe, progress=progress, records=records)
