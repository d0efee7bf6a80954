"""Padding: the one helper that turns token lists of different lengths into a batch.

Training right-pads (labels with ``IGNORE_INDEX``), log-likelihood scoring right-pads so positions need
no position ids, and generation left-pads so every row's next token sits in the last column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def pad(
    rows: Sequence[Sequence[int]], value: int, *, side: Literal["right", "left"] = "right", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, W], attention mask [B, W]) with each row padded by ``value`` on ``side`` to width ``W``.

    ``W`` is the longest row unless given. The mask is 1 on a row's own tokens, 0 on padding.
    """
    longest = max((len(r) for r in rows), default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"cannot pad rows of up to {longest} tokens to width {width}")
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not len(r):
            continue
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.as_tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
