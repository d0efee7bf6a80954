"""Plots that methods draw for their own outputs (pure matplotlib, no pktransfer dependencies).

The comparison's tables and plots are in :mod:`pktransfer.reports`.
"""

from __future__ import annotations

from typing import Any


def plot_layer_scores(scores: list[float], chosen: list[int], path: Any, *, title: str, ylabel: str) -> Any:
    """Bar chart of one score per layer (numbered from 1), the chosen layers highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(scores) + 2), 3.5))
    xs = list(range(1, len(scores) + 1))
    ax.bar(xs, scores, color=["#d9822b" if x in chosen else "#8fb3d9" for x in xs], edgecolor="#2b4c7e")
    ax.set_xlabel("layer (1-based; highlighted: chosen)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
