"""The dtype a model is scored in (``evaluation.dtype``).

Before and after must be scored alike: a trained student whose method worked in another dtype (LaTen merges its delta
in float32 into a bfloat16 student) is cast to the untouched student's dtype, or every model to the one dtype the
recipe names (the paper recipes: float16, Open-Instruct's). Only parameters are cast: buffers keep the dtype the model
was built with (a rotary ``inv_freq`` stays float32, as ``from_pretrained`` leaves it in a bfloat16 model), so a model
cast to a dtype computes what the same model loaded in that dtype computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# casts whose way back gives every value exactly: float32 holds every bfloat16 and float16 value
LOSSLESS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def params_dtype(model: Any) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one's)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def cast_params(model: Any, dtype: torch.dtype) -> None:
    """Cast every floating-point parameter in place (tied parameters once); buffers are left as they are."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


@contextmanager
def scored_in(model: Any, dtype: torch.dtype | None, restore: bool = True) -> Iterator[None]:
    """Hold ``model`` in ``dtype`` (None: as it is) inside the block; with ``restore`` give every parameter back its
    exact value afterwards (a CPU copy is kept while the block runs where the round trip would round, e.g. bfloat16 to
    float16 and back)."""
    current = params_dtype(model)
    if dtype is None or dtype == current:
        yield
        return
    saved = None
    if restore and (current, dtype) not in LOSSLESS:
        saved = [p.detach().to("cpu", copy=True) for p in model.parameters()]
    cast_params(model, dtype)
    try:
        yield
    finally:
        if restore:
            if saved is None:
                cast_params(model, current)
            else:
                for p, v in zip(model.parameters(), saved, strict=True):
                    p.data = v.to(p.device)
