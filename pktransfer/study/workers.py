"""Several worker processes on one grid (``pkt compare --workers N``): each runs ``pkt compare`` on the same recipe and
they share the grid through claims (``schedule.run_claimed``); the report is then written once from the finished
cells, the same report one process writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from pktransfer.errors import OutputError
from pktransfer.progress import Progress
from pktransfer.runs import check_output_location, check_replaceable, read_marker, result_fields, write_marker
from pktransfer.study.grid import CompareResult, compare
from pktransfer.study.plan import plan_grid, plan_tuning
from pktransfer.study.schedule import worker_plan


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
    run_workers(cmd, envs, logs, progress)
    return compare(recipe, progress=progress, records=records)


def run_workers(cmd: list[str], envs: list[dict[str, str]], logs: Path, progress: Progress) -> None:
    """Start one process per environment on ``cmd`` (each logging to ``logs/worker-K.log``) and wait for all of
    them; one error names every worker that failed."""
    import subprocess

    procs = []
    for i, env in enumerate(envs):
        log = (logs / f"worker-{i}.log").open("a")
        threads = ["--threads", env["PKT_THREADS"]] if "PKT_THREADS" in env else []
        proc = subprocess.Popen([*cmd, *threads], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        progress.log(f"compare: worker {i} started (pid {proc.pid}, log {logs / f'worker-{i}.log'})")
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
