"""A study: a grid of methods x seeds on one pair and task at one training budget, run, recorded and analysed.

One module per question (docs/study-package.md has the map):

- ``plan``: what cells exist and why (entries, sweeps, tuning, matched cells);
- ``budget``: what the compute allows (the pilot, the estimate, the cut rule);
- ``schedule``: who runs which job when (claims, shared work, workers' environments);
- ``records``: what a finished cell leaves and how it comes back (records, restore, relocate, reruns);
- ``analysis``: records to numbers (summaries, contrasts, adjusted families, teacher costs);
- ``grid``: the protocol, ``compare``: plan -> budget -> tune -> choose -> run -> analyse -> render;
- ``interim``: the report of a grid still running; ``workers``: several processes on one grid.

Each imports only the ones above it in this list.
"""

from pktransfer.study.analysis import contrast, summarize
from pktransfer.study.grid import CompareResult, compare
from pktransfer.study.interim import interim_report
from pktransfer.study.plan import Cell, plan_grid, plan_tuning
from pktransfer.study.schedule import worker_plan
from pktransfer.study.workers import compare_with_workers

__all__ = [
    "Cell",
    "CompareResult",
    "compare",
    "compare_with_workers",
    "contrast",
    "interim_report",
    "plan_grid",
    "plan_tuning",
    "summarize",
    "worker_plan",
]
