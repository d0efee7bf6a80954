"""The one top-k rule every method uses: the k highest scores, ties to the lower index.

Seeking's layer and dimension selection, LaTen's layer and neuron location and SemAlign's critical
layers all rank with it, so a tie is broken the same way everywhere (the order ``torch.topk`` gives
among equal values is not specified).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top_k(scores: torch.Tensor | Sequence[float], k: int, *, in_index_order: bool = False) -> torch.Tensor:
    """Indices of the ``k`` highest scores, best first; ties go to the lower index.

    ``in_index_order=True`` returns the same set in increasing index order (layer and dimension
    selections keep the model's order). Scores are compared in float64.
    """
    values = torch.as_tensor(scores if isinstance(scores, torch.Tensor) else list(scores), dtype=torch.float64)
    if values.dim() != 1:
        raise ValueError(f"top_k ranks a 1-D score vector, got shape {tuple(values.shape)}")
    if not 0 <= k <= values.numel():
        raise ValueError(f"cannot take the top {k} of {values.numel()} scores")
    # a stable descending sort keeps the lower index first among equal values
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    return torch.sort(order).values if in_index_order else order
