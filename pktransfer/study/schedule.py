"""Who runs which job when: claims on folders, so any number of workers (terminals, machines on a shared filesystem,
a job array, ``pkt compare --workers``) share one grid and each job runs exactly once; the reuse check of finished
folders; the shared jobs a grid's cells ask for (Seeking's sensitivity, ...); and each worker process's environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pktransfer.errors import PktError, RecipeError
from pktransfer.methods import registry
from pktransfer.progress import Progress
from pktransfer.recipe import Recipe
from pktransfer.runs import check_matches, check_same_weights, result_fields
from pktransfer.study.plan import Cell


def finished(folder: Path) -> bool:
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
            if finished(folder):
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
                if not finished(folder):  # finished by another worker between the check and the claim
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
        pending = [j for j in waiting if not finished(j[0])]
        if pending:
            time.sleep(poll)
    if failed:
        raise PktError(
            f"{len(failed)} job(s) of the grid failed: " + "; ".join(f"{what}: {reason}" for what, reason in failed),
            hint="a failed cell's OUTPUT.partial/FAILED.json says why; fix the cause and rerun the same command: "
            "finished cells are kept and the failed ones start again or resume from their checkpoint",
        )


def reusable(folder: Path, recipe: Recipe, what: str) -> bool:
    """A finished folder of the grid: reusable only when made with the same recipe and, where it read a local model
    folder, the same weights (else a clear error)."""
    if not finished(folder):
        return False
    check_matches(folder, result_fields(recipe.dump()), what)
    check_same_weights(folder, {"teacher": recipe.teacher, "student": recipe.student}, what)
    return True


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
