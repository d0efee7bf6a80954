"""`pkt compare`: a grid of methods x seeds on one pair and task, at one training budget, with statistics.

The protocol, as ``compare`` runs it: plan every cell (and check each before any work) -> apply the budget rule ->
tune on validation (one seed; the test split is not read until every value is chosen) -> choose -> run the grid (the
shared work once, the untouched models once, every cell once, claimed so any number of workers share it) -> analyse
-> render. Each step is a function of this module or of the modules it imports: ``plan`` (what cells exist),
``budget`` (what the compute allows), ``schedule`` (who runs what when), ``records`` (what a finished cell leaves),
``analysis`` (records to numbers) and ``pktransfer.reports`` (numbers to compare.md/.csv and plots).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pktransfer.fileio import write_text
from pktransfer.progress import Progress
from pktransfer.recipe import Recipe, save_recipe
from pktransfer.runs import check_output_location, check_replaceable, read_marker, result_fields, write_marker
from pktransfer.study.analysis import SharedLedger, build_result, task_chance
from pktransfer.study.budget import apply_budget, remaining_seconds_of_cells
from pktransfer.study.plan import Cell, TuneCell, choose, plan_grid, plan_matched, plan_tuning
from pktransfer.study.records import (
    REPORT_FILES,
    cell_record,
    grid_constraints,
    recorded_reruns,
    restore_records,
    save_record,
    tuning_row,
)
from pktransfer.study.schedule import attach_shared_work, finished, reusable, run_claimed

Job = tuple[Path, str, Callable[[], Any]]


@dataclass
class CompareResult:
    output_dir: Path
    result: dict[str, Any]


@dataclass
class Grid:
    """A study's folder while it runs: its recipe (after the budget rule), where it is, its records folder, its
    progress, and the costs of the shared work its cells read."""

    recipe: Recipe
    root: Path
    records_dir: Path | None
    progress: Progress
    ledger: SharedLedger = field(default_factory=SharedLedger)
    ran: int = 0  # jobs this invocation ran (cells, shared work, the untouched models)

    def record(self, folder: Path) -> None:
        """Mirror a finished folder's result into the records folder (when the study keeps one)."""
        if self.records_dir is not None:
            save_record(Path(folder).resolve(), self.root, self.records_dir)

    def run(self, recipe: Recipe, folder: Path) -> None:
        """Run one cell's recipe with the grid's shared caches, then record it."""
        from pktransfer import pipeline
        from pktransfer.memory import release_memory

        self.ran += 1
        pipeline.run(recipe, progress=self.progress, cache_dir=self.root / "shared")
        release_memory()
        self.record(folder)

    def run_shared(self, cells: list[Cell]) -> None:
        """The shared work these cells ask for, each job once (a finished one serves every cell that asks for it: its
        folder's name is the hash of everything it depends on), and its cost noted in the ledger."""
        from pktransfer import pipeline
        from pktransfer.memory import release_memory

        jobs: list[Job] = []
        shared = attach_shared_work(cells, self.root)
        for folder, r, verb, needed in shared:
            if not finished(Path(folder)) and not all(finished(c.folder) for c in needed):

                def job(r: Recipe = r, verb: str = verb) -> None:
                    self.ran += 1
                    pipeline.run_verb(r, verb, progress=self.progress)
                    release_memory()

                jobs.append((Path(folder), f"running `{verb}` once for the cells of '{r.method.name}' ({folder})", job))
        run_claimed(jobs, self.progress)  # other workers wait for shared work another one is doing
        for folder, _, _, needed in shared:
            run_json: Path | None = Path(folder) / "run.json"
            if finished(Path(folder)):
                self.record(Path(folder))  # its run.json (the cost), not its caches
            elif self.records_dir is not None:
                run_json = self.records_dir / Path(folder).relative_to(self.root) / "run.json"
            else:
                run_json = None
            self.ledger.note(folder, needed, run_json)


def compare(
    recipe: Recipe,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    records: str | Path | None = None,
) -> CompareResult:
    """Run (or resume) the recipe's comparison grid and write the comparison report.

    ``records``: a folder mirroring each finished folder's result without its weights (``records.save_record``); the
    grid resumes from it on another machine, and the report is copied there too."""
    grid = open_grid(recipe, overwrite, progress or Progress(quiet=quiet), records)
    budget = None
    if grid.recipe.compare is not None and grid.recipe.compare.budget is not None:
        grid.recipe, budget = apply_budget(grid.recipe, grid.root, grid.records_dir, grid.progress, grid.record)
    started = time.time()
    tune_cells = plan_tuning(grid.recipe)
    tuning = tune(grid, tune_cells)
    chosen = choose(tuning)
    for label, kv in chosen.items():
        grid.progress.log(f"compare: {label}: chose {', '.join(f'{k} = {v}' for k, v in kv.items())} on validation")
    cells, secondary = grid_cells(grid.recipe, chosen)
    base_info = run_grid(grid, cells, tuning)
    result = build_result(
        grid.recipe,
        [cell_record(c) for c in cells],
        secondary=secondary,
        tuning=tuning,
        chosen=chosen,
        base_info=base_info,
        shared=grid.ledger,
        reruns=recorded_reruns(grid.records_dir, grid.root, [*(tc.cell for tc in tune_cells), *cells]),
        budget=budget,
    )
    result["wall_seconds_this_invocation"] = round(time.time() - started, 1)
    if not grid.ran:  # re-rendering a finished grid: the invocation that did the work keeps its figure
        result["wall_seconds_this_invocation"] = previous_wall_seconds(grid) or result["wall_seconds_this_invocation"]
    write_report(grid, result, cells)
    return CompareResult(grid.root, result)


def previous_wall_seconds(grid: Grid) -> float | None:
    """The wall time the grid's last report recorded (its folder's compare.json, else its records'), if any."""
    for folder in (grid.root, grid.records_dir):
        if folder is None or not (folder / "compare.json").is_file():
            continue
        try:
            return json.loads((folder / "compare.json").read_text()).get("wall_seconds_this_invocation")
        except (OSError, ValueError):
            continue
    return None


def open_grid(recipe: Recipe, overwrite: bool, progress: Progress, records: str | Path | None) -> Grid:
    """Plan and check every cell before any work, then open the grid's folder (refusing one pktransfer did not write)
    and restore the records folder's finished cells into it."""
    from pktransfer import pipeline

    tune_cells = plan_tuning(recipe)
    cells = [*plan_grid(recipe), *(tc.cell for tc in tune_cells)]  # every entry is checked before any work
    root = Path(recipe.output_dir).expanduser().resolve()
    check_output_location(root)
    check_replaceable(root, "comparison folder")  # refuse a folder pktransfer did not write, before any work
    for c in cells:  # everything checkable before any model is loaded
        pipeline.check_recipe(c.recipe)
    if recipe.compare is not None and recipe.compare.against_chance:
        task_chance(recipe)
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
    return Grid(recipe, root, records_dir, progress)


def tune(grid: Grid, tune_cells: list[TuneCell]) -> list[dict[str, Any]]:
    """Run every tuning cell (validation only, one seed) and return their rows; every one is finished, by this worker
    or another, before any test evaluation starts."""
    if not tune_cells:
        return []
    grid.run_shared([tc.cell for tc in tune_cells])
    for tc in tune_cells:
        reusable(tc.cell.folder, tc.cell.recipe, f"finished tuning cell {tc.label} ({tc.key} = {tc.value})")
    jobs: list[Job] = []
    for i, tc in enumerate(tune_cells, 1):
        what = f"tuning {i}/{len(tune_cells)}: {tc.label}, {tc.key} = {tc.value} (validation)"
        jobs.append((tc.cell.folder, what, lambda tc=tc: grid.run(tc.cell.recipe, tc.cell.folder)))
    run_claimed(jobs, grid.progress, keep_going=True)
    for tc in tune_cells:
        grid.record(tc.cell.folder)
    return [tuning_row(tc, tc.cell) for tc in tune_cells]


def grid_cells(recipe: Recipe, chosen: dict[str, dict[str, Any]]) -> tuple[list[Cell], list[str]]:
    """The test cells at the chosen values, with the matched cells (checked now: the untuned ones were checked before
    any work), and the labels of the matched cells (secondary: outside the family of comparisons with the baseline)."""
    from pktransfer import pipeline

    if not chosen:
        return plan_grid(recipe), []
    matched = plan_matched(recipe, chosen)
    cells = plan_grid(recipe, chosen) + matched
    for cell in cells:
        pipeline.check_recipe(cell.recipe)
    return cells, sorted({c.label for c in matched})


def run_grid(grid: Grid, cells: list[Cell], tuning: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The shared work, the untouched models' evaluation and every unfinished cell, claimed (a finished cell made with
    another recipe is refused, never silently reused); returns the untouched models' run.json (None without one)."""
    grid.run_shared(cells)
    for c in cells:
        reusable(c.folder, c.recipe, f"finished cell {c.label} (seed {c.seed})")
    base_dir, jobs = grid.root / "base", base_job(grid)
    todo = [c for c in cells if not finished(c.folder)]
    assert grid.recipe.compare is not None
    grid.progress.log(
        f"compare: {len(cells)} cells ({len(cells) - len(todo)} already finished), "
        f"{len(grid.recipe.compare.methods)} entries x seeds {grid.recipe.compare.seeds}"
    )
    for i, cell in enumerate(cells, 1):
        if not finished(cell.folder):
            jobs.append(
                (cell.folder, f"cell {i}/{len(cells)}: {cell.label}, seed {cell.seed}", cell_job(grid, cell, cells, tuning))
            )
    run_claimed(jobs, grid.progress, keep_going=True)  # the report needs every cell, whichever worker ran it
    base_info = None
    if grid.recipe.evaluation.teacher or grid.recipe.evaluation.student:
        grid.record(base_dir)
        base_info = json.loads((base_dir / "run.json").read_text())
    for c in cells:
        grid.record(c.folder)
    return base_info


def base_job(grid: Grid) -> list[Job]:
    """The untouched models' evaluation: one more job beside the cells (the report needs it, no cell does)."""
    from pktransfer import pipeline
    from pktransfer.memory import release_memory

    base_dir = grid.root / "base"
    base_recipe = grid.recipe.model_copy(update={"output_dir": str(base_dir), "compare": None})
    if not (grid.recipe.evaluation.teacher or grid.recipe.evaluation.student):
        return []
    if reusable(base_dir, base_recipe, "the untouched models' evaluation (base/)"):
        grid.record(base_dir)  # finished earlier (by this grid or another worker): recorded now, not only with the report
        return []

    def base() -> None:
        grid.ran += 1
        pipeline.evaluate_pair(base_recipe, progress=grid.progress)
        release_memory()
        grid.record(base_dir)  # at once, like a cell: a grid resumed elsewhere from its records does not redo it

    return [(base_dir, "evaluating the untouched teacher and student once", base)]


def cell_job(grid: Grid, cell: Cell, cells: list[Cell], tuning: list[dict[str, Any]]) -> Callable[[], None]:
    """Run one cell, first logging how long the unfinished cells will take (each at its entry's mean time over the
    finished cells, else over its tuning cells)."""

    def job() -> None:
        done: dict[str, list[float]] = {}
        for c in cells:
            if finished(c.folder):
                done.setdefault(c.label, []).append(json.loads((c.folder / "run.json").read_text())["wall_seconds"])
        pending = [c.label for c in cells if not finished(c.folder)]
        tuned: dict[str, list[float]] = {}
        for t in tuning:
            tuned.setdefault(t["label"], []).append(t["wall_seconds"])
        left = remaining_seconds_of_cells(pending, done, tuned)
        if left is not None:
            grid.progress.log(
                f"compare: about {left / 3600:.1f} h of cells left ({len(pending)} unfinished, this one included; "
                "each at its entry's mean time over the finished cells, else over its tuning cells)"
            )
        grid.run(cell.recipe, cell.folder)

    return job


def write_report(grid: Grid, result: dict[str, Any], cells: list[Cell]) -> None:
    """compare.json, .csv, the plots, compare.md and constraints.txt in the grid's folder (and the records folder)."""
    from pktransfer.reports import plot_compare, render_compare_csv, render_compare_markdown

    root = grid.root
    write_text(root / "compare.json", json.dumps(result, indent=1))
    write_text(root / "compare.csv", render_compare_csv(result))
    result["plots"] = [p.name for p in plot_compare(result, root)]
    write_text(root / "compare.md", render_compare_markdown(result))
    constraints, mixed = grid_constraints([json.loads((c.folder / "run.json").read_text()) for c in cells])
    write_text(root / "constraints.txt", constraints)
    for line in mixed:
        grid.progress.warn(f"compare: the cells ran with different versions of {line} (see constraints.txt)")
    if grid.records_dir is not None:
        for name in REPORT_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, grid.records_dir / name)
