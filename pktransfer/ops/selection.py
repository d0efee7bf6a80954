"""Layer selection and dimension reduction: which teacher indices feed which student weight.

Every function is pure: it takes scores or sensitivity reductions and returns sorted index tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pktransfer.ops.ranking import top_k

LAYER_STRATEGIES = ("sensitivity", "random", "top", "first", "uniform", "last")
STRUCTURES = ("submatrix", "row_column", "neuron", "random", "uniform")


def select_layers(scores: Sequence[float], n: int, strategy: str | Sequence[int] = "sensitivity", seed: int = 0) -> list[int]:
    """Pick ``n`` of ``len(scores)`` teacher layers, returned in their original order.

    sensitivity: the n highest scores (ties: lower index first); random: seeded; top or first: the first
    n; uniform: evenly spaced, first and last included; last: the last n; a list: exactly those layers.
    """
    total = len(scores)
    if n > total:
        raise ValueError(f"cannot select {n} layers from a teacher with {total}")
    if not isinstance(strategy, str):
        chosen = sorted(int(i) for i in strategy)
        if len(chosen) != n or len(set(chosen)) != n or any(not 0 <= i < total for i in chosen):
            raise ValueError(f"explicit layer list must hold {n} distinct indices in 0..{total - 1}, got {list(strategy)}")
        return chosen
    if strategy == "sensitivity":
        return top_k(scores, n, in_index_order=True).tolist()
    if strategy == "random":
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(total, generator=g)[:n].tolist())
    if strategy in ("top", "first"):
        return list(range(n))
    if strategy == "uniform":
        return uniform_indices(total, n).tolist()
    if strategy == "last":
        return list(range(total - n, total))
    raise ValueError(f"unknown layer strategy '{strategy}' (allowed: {', '.join(LAYER_STRATEGIES)}, or a list)")


def uniform_indices(n_from: int, n_to: int) -> torch.Tensor:
    """Evenly spaced indices (weight selection): n_to of n_from, first and last included when n_to > 1."""
    if n_to > n_from:
        raise ValueError(f"cannot pick {n_to} of {n_from} indices")
    if n_to == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.round(torch.linspace(0, n_from - 1, n_to, dtype=torch.float64)).long()


def space_indices(teacher_sizes: dict[str, int], student_sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """One evenly spaced index set per named space (residual, heads, kv_heads, mlp, ...).

    Every weight then cuts its rows with its output space's set and its columns with its input
    space's set, so tensors that share a dimension keep the same teacher indices (Xu et al. 2024).
    """
    out = {}
    for space, n_s in student_sizes.items():
        n_t = teacher_sizes[space]
        if n_s > n_t:
            raise ValueError(f"the student's {space} dimension ({n_s}) is larger than the teacher's ({n_t})")
        out[space] = uniform_indices(n_t, n_s)
    return out


def random_indices(n_from: int, n_to: int, seed: int) -> torch.Tensor:
    if n_to > n_from:
        raise ValueError(f"cannot pick {n_to} of {n_from} indices")
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_from, generator=g)[:n_to]).values


def max_sum_window(values: torch.Tensor, width: int) -> int:
    """Start of the contiguous window of ``width`` with the largest sum (ties: lowest start)."""
    v = values.to(torch.float64)
    c = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(v, 0)])
    sums = c[width:] - c[:-width]
    return int(torch.argmax(sums))


def max_sum_submatrix(scores: torch.Tensor, height: int, width: int, chunk: int = 512) -> tuple[int, int, float]:
    """Top-left (row, col) of the ``height x width`` block with the largest sum, and that sum.

    Vectorised summed-area search, exact in float64. Stage 1 takes window sums along the contiguous
    column axis, ``chunk`` rows at a time through one reused cache-resident buffer (cumulative sum in
    place, then a difference), writing them transposed; stage 2 does the same along rows on that
    smaller result. Cumulative sums only run along the last axis, where torch is fast, and no buffer
    the size of the whole matrix is allocated in float64. Ties go to the lowest (row, column)
    position, like a loop over positions in row-major order.
    """
    h_all, w_all = scores.shape
    if height > h_all or width > w_all:
        raise ValueError(f"block {height}x{width} does not fit in a {h_all}x{w_all} matrix")
    n_cols = w_all - width + 1
    col_sums_t = torch.empty((n_cols, h_all + 1), dtype=torch.float64)  # [col offset, 0 | rows]
    col_sums_t[:, 0] = 0
    buf = torch.empty((min(chunk, h_all), w_all + 1), dtype=torch.float64)
    buf[:, 0] = 0
    for r0 in range(0, h_all, chunk):
        r1 = min(r0 + chunk, h_all)
        b = buf[: r1 - r0]
        b[:, 1:].copy_(scores[r0:r1])
        b.cumsum_(dim=1)
        col_sums_t[:, 1 + r0 : 1 + r1].copy_((b[:, width:] - b[:, :-width]).T)  # sums of `width` columns
    col_sums_t.cumsum_(dim=1)
    blocks_t = col_sums_t[:, height:] - col_sums_t[:, :-height]  # [W-w+1, H-h+1], indexed (col, row)
    best = blocks_t.max()
    cols_at, rows_at = torch.nonzero(blocks_t == best, as_tuple=True)
    k = int(torch.argmin(rows_at * n_cols + cols_at))  # row-major: the lowest (row, col) among the maxima
    return int(rows_at[k]), int(cols_at[k]), float(best)


def max_sum_submatrix_bruteforce(scores: torch.Tensor, height: int, width: int) -> tuple[int, int, float]:
    """Reference: the paper's loop over every top-left position (slow; for tests and benchmarks)."""
    s = scores.to(torch.float64)
    p = torch.zeros(s.shape[0] + 1, s.shape[1] + 1, dtype=torch.float64)
    p[1:, 1:] = s.cumsum(0).cumsum(1)
    best, pos = -float("inf"), (0, 0)
    for i in range(s.shape[0] - height + 1):
        for j in range(s.shape[1] - width + 1):
            v = float(p[i + height, j + width] - p[i, j + width] - p[i + height, j] + p[i, j])
            if v > best:
                best, pos = v, (i, j)
    return pos[0], pos[1], best


def reduce_dims(
    structure: str,
    target: tuple[int, int],
    *,
    full: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    source: tuple[int, int] | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the teacher matrix that form the student-shaped matrix.

    submatrix: the contiguous block with the largest summed sensitivity (needs ``full``);
    row_column: top rows by row mass and top columns by column mass (needs ``rows``, ``cols``);
    neuron: whole top rows by row mass, with the contiguous column window of largest column mass;
    random: seeded random rows and columns; uniform: evenly spaced rows and columns.
    """
    out_s, in_s = target
    if source is None:
        if full is not None:
            source = (full.shape[0], full.shape[1])
        elif rows is not None and cols is not None:
            source = (rows.numel(), cols.numel())
        else:
            raise ValueError("source shape is needed without sensitivity")
    out_t, in_t = source
    if out_s > out_t or in_s > in_t:
        raise ValueError(f"student shape {out_s}x{in_s} does not fit in teacher shape {out_t}x{in_t}")
    if structure == "submatrix":
        if full is None:
            raise ValueError("the submatrix structure needs the full sensitivity map")
        r0, c0, _ = max_sum_submatrix(full, out_s, in_s)
        return torch.arange(r0, r0 + out_s), torch.arange(c0, c0 + in_s)
    if structure == "row_column":
        assert rows is not None and cols is not None
        return top_k(rows, out_s, in_index_order=True), top_k(cols, in_s, in_index_order=True)
    if structure == "neuron":
        assert rows is not None and cols is not None
        c0 = max_sum_window(cols, in_s)
        return top_k(rows, out_s, in_index_order=True), torch.arange(c0, c0 + in_s)
    if structure == "random":
        return random_indices(out_t, out_s, seed), random_indices(in_t, in_s, seed + 1)
    if structure == "uniform":
        return uniform_indices(out_t, out_s), uniform_indices(in_t, in_s)
    raise ValueError(f"unknown structure '{structure}' (allowed: {', '.join(STRUCTURES)})")
