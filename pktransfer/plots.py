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


def plot_cka(cka: Any, pairings: dict[str, list[list[int]]], path: Any, *, title: str) -> Any:
    """Heat map of CKA [teacher layers, student layers] with each method's (teacher, student) pairs on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_t, n_s = cka.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.22 * n_t + 2.5), max(4.0, 0.22 * n_s + 1.5)))
    im = ax.imshow(cka.T, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1, extent=(0.5, n_t + 0.5, 0.5, n_s + 0.5))
    fig.colorbar(im, ax=ax, label="linear CKA")
    styles = {
        "seeking": ("o", "#ff7f0e"),
        "semalign_grid": ("x", "#ffffff"),
        "semalign_critical": ("*", "#d62728"),
        "laten": ("s", "#e377c2"),
    }
    for name, pairs in pairings.items():
        if pairs:
            marker, color = styles.get(name, ("+", "#000000"))
            style = {"facecolors": "none", "edgecolors": color} if marker in "os" else {"color": color}
            ax.scatter([t for t, _ in pairs], [s for _, s in pairs], marker=marker, s=28, label=name, linewidths=1.2, **style)
    ax.set_xlabel("teacher layer (1-based)")
    ax.set_ylabel("student layer (1-based)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7, framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fidelity(fidelity: dict[str, dict[str, list[Any]]], path: Any) -> Any:
    """SemAlign's premise per layer: own round trips and teacher -> student targets (paper_v1, dual, random)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for who, ls in (("teacher_self", "-"), ("student_self", "--")):
        for kind, color in (("paper_v1", "#1f77b4"), ("dual", "#2ca02c")):
            ys = fidelity[who][kind]
            axes[0].plot(
                range(1, len(ys) + 1),
                [float("nan") if y is None else y for y in ys],
                ls,
                color=color,
                label=f"{who.split('_')[0]} {kind}",
            )
    axes[0].set_title("own round trip: cos(recomposed, h)")
    axes[0].set_xlabel("layer (1-based)")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7)
    for kind, color in (("paper_v1", "#1f77b4"), ("dual", "#2ca02c"), ("random", "#7f7f7f")):
        ys = fidelity["cross"][kind]
        axes[1].plot(
            range(1, len(ys) + 1), [float("nan") if y is None else y for y in ys], "o-", color=color, label=kind, markersize=3
        )
    axes[1].axhline(0, color="black", linewidth=0.6)
    axes[1].set_title("teacher target vs the student's activation: cos")
    axes[1].set_xlabel("student layer (1-based)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
