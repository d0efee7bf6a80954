"""Batched greedy generation with left padding and stop sequences."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        if x:
            ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
    return ids, mask


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
             stop_token_ids: Sequence[int], stop_strings: Sequence[str] = (),
             on_batch: Callable[[int, int], None] | None = None) -> tuple[list[str], int]:
    """Greedy-decode every prompt (token ids). Returns the texts (in input order) and generated token count.

    Prompts are sorted by length so batches waste little padding; results are put back in order.
    ``on_batch(done, generated_tokens)`` is called after each batch (for progress bars).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids[0]
    n_tokens = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=list(stop_token_ids), pad_token_id=pad_id)
        new = gen[:, ids.shape[1]:].cpu()
        for row, i in zip(new, idx, strict=True):
            toks = row.tolist()
            for j, t in enumerate(toks):
                if t in stop_token_ids:
                    toks = toks[:j]
                    break
            n_tokens += len(toks)
            out[i] = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), stop_strings)
        if on_batch:
            on_batch(len(idx), n_tokens)
    return out, n_tokens
