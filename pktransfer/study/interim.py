"""The report of a study still running: the cells finished so far, running nothing.

From the grid's folder, or where a folder is missing there from the records folder (a fresh clone of a study). Written
as compare.interim.md/.json beside the grid (and into the records), never as compare.md, with a banner naming every
unfinished cell; the statistics pair only the seeds an entry and the baseline both have.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pktransfer.errors import OutputError
from pktransfer.fileio import write_text
from pktransfer.recipe import Recipe
from pktransfer.study.analysis import SharedLedger, build_result
from pktransfer.study.grid import CompareResult
from pktransfer.study.plan import Cell, choose, plan_grid, plan_matched, plan_tuning, without_entries
from pktransfer.study.records import cell_record, recorded_reruns, tuning_row
from pktransfer.study.schedule import attach_shared_work, finished

INTERIM_FILES = ("compare.interim.md", "compare.interim.json")


class Finder:
    """Where a finished folder of the grid is: in the grid, else in the records (None when neither has it)."""

    def __init__(self, root: Path, records_dir: Path | None) -> None:
        self.root, self.records_dir = root, records_dir

    def __call__(self, folder: Path) -> Path | None:
        if finished(folder):
            return folder
        if self.records_dir is not None:
            mirrored = self.records_dir / folder.resolve().relative_to(self.root)
            if (mirrored / "run.json").is_file():
                return mirrored
        return None


def interim_report(recipe: Recipe, *, records: str | Path | None = None) -> CompareResult:
    """The interim report (module docstring). Needs the grid's tuning finished (its chosen values decide the cells)
    and, with ``compare.budget``, its recorded decision."""
    from pktransfer.reports import render_compare_markdown

    assert recipe.compare is not None
    root = Path(recipe.output_dir).expanduser().resolve()
    records_dir = Path(records).expanduser().resolve() if records is not None else None
    where = Finder(root, records_dir)
    recipe, budget = recorded_budget(recipe, root, records_dir)
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
    ledger = SharedLedger()
    for group in ([tc.cell for tc in tune_cells], cells):
        for folder, _, _, needed in attach_shared_work(group, root):
            found_at = where(Path(folder))
            ledger.note(folder, needed, found_at / "run.json" if found_at is not None else None)
    done, missing = split_finished(cells, where, root)
    base_at = where(root / "base")
    result = build_result(
        recipe,
        [cell_record(c) for c in done],
        secondary=sorted({c.label for c in matched}),
        tuning=tuning,
        chosen=chosen,
        base_info=json.loads((base_at / "run.json").read_text()) if base_at is not None else None,
        shared=ledger,
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


def recorded_budget(recipe: Recipe, root: Path, records_dir: Path | None) -> tuple[Recipe, dict[str, Any] | None]:
    """The grid's budget decision as recorded (budget.json in the grid or the records) and the recipe without the
    entries it dropped; a grid with a budget rule and no decision yet has no interim report."""
    assert recipe.compare is not None
    if recipe.compare.budget is None:
        return recipe, None
    found = [d / "budget.json" for d in (root, records_dir) if d is not None and (d / "budget.json").is_file()]
    if not found:
        raise OutputError(
            f"the grid in '{root}' has not decided its budget yet (no budget.json there"
            + (f" or in '{records_dir}')" if records_dir else ")"),
            hint="start the grid with `pkt compare RECIPE` first; the interim report comes after its pilot",
        )
    budget = json.loads(found[0].read_text())
    return without_entries(recipe, budget["dropped"]), budget


def split_finished(cells: list[Cell], where: Finder, root: Path) -> tuple[list[Cell], list[Cell]]:
    """The finished cells (pointing where their results are) and the unfinished ones; refuses a grid with none."""
    found = {c.folder: where(c.folder) for c in cells}
    done = [replace(c, folder=f) for c in cells if (f := found[c.folder]) is not None]
    if not done:
        raise OutputError(
            f"no test cell of the grid in '{root}' has finished yet", hint="run `pkt compare RECIPE` and try again later"
        )
    return done, [c for c in cells if found[c.folder] is None]
