"""What cells a study has, and why: the recipe's entries (expanded over their sweeps) x seeds, the tuning cells on
validation, the cells ``compare.matched`` adds at a partner's tuned values, and the entries a budget decision drops.

Every cell is a full recipe whose only differences from the study's are the method, the entry's overrides and the
seed. Entries may not touch the pair, task or evaluation (``recipe.FIXED_KEYS``) and may change the training budget
(``recipe.BUDGET_KEYS``) only with ``compare.allow_unequal_budget``. Every cell is validated when planned, before any
work starts. Pure: nothing here reads or writes a file.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pktransfer.errors import RecipeError
from pktransfer.recipe import BUDGET_KEYS, FIXED_KEYS, Recipe, TuneSpec, apply_overrides, recipe_from_dict


@dataclass
class Cell:
    label: str
    seed: int
    recipe: Recipe
    folder: Path


@dataclass
class TuneCell:
    label: str
    key: str
    index: int
    value: Any
    cell: Cell


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


def grid_counts(recipe: Recipe) -> tuple[dict[str, tuple[int, int]], dict[tuple[str, str], int]]:
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
