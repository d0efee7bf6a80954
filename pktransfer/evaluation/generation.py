"""Batched greedy generation with left padding and stop sequences."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from pktransfer.data.batching import pad
from pktransfer.ops.offload import input_device, stored_value


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Make the LM head's input contiguous while decoding.

    transformers slices the last position before the head (``hidden_states[:, -1:, :]``, a non-contiguous
    [B, 1, D] view). PyTorch on CPU multiplies such a 3-D view with a weight that does not require grad (every
    merged or frozen model) by expanding the [V, D] weight over the batch: measured 19 s instead of 0.05 s for
    the offline student's head at batch 8, and about 2 GB of copies per row. The contiguous copy gives bitwise
    the same logits (tested)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        yield
        return

    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    handle = head.register_forward_pre_hook(hook, prepend=True)  # before any other hook sees the input
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    stop_strings: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[list[str], int]:
    """Decode every prompt (token ids): greedy, or sampled when ``temperature`` > 0 (seed torch first; ``top_p`` < 1:
    nucleus sampling).

    Returns the texts (in input order) and the generated token count. Prompts are sorted by length so
    batches waste little padding; results are put back in order. Generation stops early at a stop
    token or once every row contains a stop string; the text is cut at the first stop string.
    ``on_batch(done, generated_tokens)`` is called after each batch (for progress bars).
    """
    device = input_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids[0]
    n_tokens = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad([prompts[i] for i in idx], pad_id, side="left")
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        with contiguous_head_input(model):
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=list(stop_token_ids),
                pad_token_id=pad_id,
                **sampling,
                **extra,
            )
        new = gen[:, ids.shape[1] :].cpu()
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


def encode_pair(tokenizer: Any, context: str, continuation: str, add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-eval splits them: trailing context spaces move to the
    continuation, and the continuation is what encoding the whole text adds after the context.
    ``add_special_tokens``: the context starts with the tokenizer's BOS (Open-Instruct's tokenisation)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    return list(ctx), list(whole[len(ctx) :])


def _head_parts(model: Any) -> tuple[Any, torch.Tensor, torch.Tensor | None, float | None] | None:
    """(decoder, float32 head weight, bias, final soft-cap) of a model with the standard decoder / output-embedding
    split, else None. The weight is upcast once, here, not per batch."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or out_emb is None or not hasattr(out_emb, "weight"):
        return None
    weight = stored_value(out_emb).float()  # an offloaded head's weight lives in accelerate's map, not on the module
    bias = stored_value(out_emb, "bias").float() if getattr(out_emb, "bias", None) is not None else None
    return decoder, weight, bias, getattr(model.config, "final_logit_softcapping", None)


def _float32_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cap: float | None) -> torch.Tensor:
    logits = torch.nn.functional.linear(h.float(), weight.to(h.device), bias.to(h.device) if bias is not None else None)
    return torch.tanh(logits / cap) * cap if cap else logits


def float32_head(model: Any) -> Callable[..., torch.Tensor]:
    """``head(ids, mask, rows=None, cols=None)``: the model's logits computed in float32 from its final hidden states,
    at every position or at (rows, cols).

    A bfloat16 LM head rounds logits of size 10-20 to steps of 0.06-0.125, so the four answer letters of an unsure
    model often tie exactly, and a tie goes to the first letter (26 of 100 MMLU items in a bfloat16 run). The
    head's matmul in float32 (and Gemma 2's final soft-cap after it) removes that rounding; a model without the
    standard decoder / output-embedding split falls back to its own logits, upcast."""
    parts = _head_parts(model)
    if parts is None:

        def own(ids: torch.Tensor, mask: torch.Tensor, rows: Any = None, cols: Any = None) -> torch.Tensor:
            logits = model(input_ids=ids, attention_mask=mask).logits
            return (logits[rows, cols] if rows is not None else logits).float()

        return own
    decoder, weight, bias, cap = parts

    def head(ids: torch.Tensor, mask: torch.Tensor, rows: Any = None, cols: Any = None) -> torch.Tensor:
        h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        h = h[rows, cols] if rows is not None else h
        return _float32_logits(h, weight, bias, cap)

    return head


def _shared_context_fits(model: Any, longest: int) -> bool:
    """Whether continuations can be scored from a cached context: the model has the decoder / head split and no
    sliding window shorter than the longest row (a window would drop cached positions the mask still names)."""
    if _head_parts(model) is None:
        return False
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", True) and window is not None
    return not uses_window or int(window) >= longest


def _shared_context_logliks(
    model: Any,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    idx: list[int],
    pad_id: int,
) -> dict[int, list[float]]:
    """The summed log-probabilities of every continuation of the contexts ``idx``, each context read once.

    One forward pass over the contexts (right-padded) gives the first token of every continuation its log-probability
    and fills the KV cache; the cache rows are then repeated, one per continuation, and one more pass over every
    continuation's remaining tokens (placed after its context's real length by position ids and the attention mask)
    gives the rest. The same sums as scoring each (context + continuation) alone, up to float rounding (tested)."""
    decoder, weight, bias, cap = _head_parts(model)  # type: ignore[misc]
    device = input_device(model)
    rows = [list(contexts[i]) for i in idx]
    ids, mask = pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    ran = decoder(input_ids=ids, attention_mask=mask, use_cache=True)  # the decoder builds its own cache
    # transformers 5.2x names the cache ``cache``; earlier versions ``past_key_values``
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    h, cache = ran.last_hidden_state, getattr(ran, cache_arg)
    first = torch.log_softmax(_float32_logits(h[torch.arange(len(rows), device=device), lengths - 1], weight, bias, cap), -1)
    out = {i: [float(first[k, c[0]]) for c in continuations[i]] for k, i in enumerate(idx)}
    owner = [(k, j) for k, i in enumerate(idx) for j, c in enumerate(continuations[i]) if len(c) > 1]
    if not owner:
        return out
    tails = [list(continuations[idx[k]][j]) for k, j in owner]
    t_ids, t_mask = pad([t[:-1] for t in tails], pad_id)  # the inputs that predict each tail's tokens after the first
    t_ids, t_mask = t_ids.to(device), t_mask.to(device)
    sel = torch.tensor([k for k, _ in owner], device=device)
    cache.batch_select_indices(sel)
    positions = lengths[sel][:, None] + torch.arange(t_ids.shape[1], device=device)[None, :]
    full_mask = torch.cat([mask[sel], t_mask], dim=1)
    h = decoder(
        input_ids=t_ids, attention_mask=full_mask, position_ids=positions, use_cache=True, **{cache_arg: cache}
    ).last_hidden_state
    # the head only where a tail token is predicted (not at padding): the fp32 head is most of the cost
    valid = t_mask.bool()
    targets, _ = pad([t[1:] for t in tails], pad_id)
    logp = torch.log_softmax(_float32_logits(h[valid], weight, bias, cap), -1)
    token_logp = logp.gather(1, targets.to(device)[valid][:, None])[:, 0]
    rows_of = torch.arange(len(tails), device=device)[:, None].expand_as(valid)[valid]
    sums = torch.zeros(len(tails), device=device, dtype=token_logp.dtype).index_add_(0, rows_of, token_logp)
    for (k, j), v in zip(owner, sums.tolist(), strict=True):
        out[idx[k]][j] += v
    return out


@torch.inference_mode()
def continuation_logliks(
    model: Any,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int,
    pad_id: int,
    on_batch: Callable[[float], None] | None = None,
) -> list[list[float]]:
    """Summed log-probability of each continuation after its context: result[i][j] for context i, choice j.

    When every continuation of a context is one token (MMLU's " A".." D"), one forward pass over the
    context scores all of them at once. Otherwise the context is read once and cached, and all of its continuations
    are scored from the cache (``batch_size`` contexts at a time); a model the cache cannot serve that way (a short
    sliding window) scores each (context + continuation) separately, ``batch_size`` rows at a time.
    Rows are sorted by length and right-padded, so positions are exact without position ids.
    """
    device = input_device(model)
    head = float32_head(model)
    out: list[list[float]] = [[] for _ in contexts]
    # longest first, so each batch holds similar lengths (little padding) and memory errors come early
    single = sorted(
        (i for i, conts in enumerate(continuations) if all(len(c) == 1 for c in conts)), key=lambda i: -len(contexts[i])
    )
    single_set = set(single)
    for start in range(0, len(single), batch_size):
        idx = single[start : start + batch_size]
        rows = [list(contexts[i]) for i in idx]
        ids, mask = pad(rows, pad_id)
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        logits = head(ids.to(device), mask.to(device), torch.arange(len(rows), device=device), last)
        logp = torch.log_softmax(logits, dim=-1)
        for k, i in enumerate(idx):
            out[i] = [float(logp[k, c[0]]) for c in continuations[i]]
        if on_batch:
            on_batch(len(idx))
    rest = sorted((i for i in range(len(contexts)) if i not in single_set), key=lambda i: -len(contexts[i]))
    longest = max((len(contexts[i]) + max(len(c) for c in continuations[i]) for i in rest), default=0)
    if rest and _shared_context_fits(model, longest):
        for start in range(0, len(rest), batch_size):
            idx = rest[start : start + batch_size]
            for i, scores in _shared_context_logliks(model, contexts, continuations, idx, pad_id).items():
                out[i] = scores
            if on_batch:
                on_batch(len(idx))
        return out
    multi = sorted(
        ((i, j) for i in rest for j in range(len(continuations[i]))),
        key=lambda p: -(len(contexts[p[0]]) + len(continuations[p[0]][p[1]])),
    )
    scores: dict[tuple[int, int], float] = {}
    for start in range(0, len(multi), batch_size):
        pairs = multi[start : start + batch_size]
        rows = [list(contexts[i]) + list(continuations[i][j]) for i, j in pairs]
        ids, mask = pad(rows, pad_id)
        logp = torch.log_softmax(head(ids.to(device), mask.to(device)), -1)
        for k, (i, j) in enumerate(pairs):
            n_ctx, cont = len(contexts[i]), continuations[i][j]
            pos = torch.arange(n_ctx - 1, n_ctx - 1 + len(cont), device=logp.device)
            scores[(i, j)] = float(logp[k, pos, torch.tensor(cont, device=logp.device)].sum())
        if on_batch:
            on_batch(sum(1 / len(continuations[i]) for i, _ in pairs))  # in items
    for (i, _j), v in sorted(scores.items()):
        out[i].append(v)
    return out


def run_batched(model: Any, requested: int | str, fn: Callable[[int], Any], start: int = 64) -> tuple[Any, int]:
    """Run ``fn(batch_size)`` and return (its result, the batch size used): the requested size, or with
    "auto" the largest that fits: on CUDA, starting at ``start`` and shrinking after each out-of-memory
    error (accelerate's find_executable_batch_size and its reduction rule); on CPU "auto" means 16."""
    if requested != "auto":
        return fn(int(requested)), int(requested)
    if input_device(model).type != "cuda":
        return fn(16), 16
    from accelerate.utils import find_executable_batch_size

    used: dict[str, int] = {}

    def attempt(batch_size: int) -> Any:
        used["bs"] = batch_size
        return fn(batch_size)

    return find_executable_batch_size(attempt, starting_batch_size=start)(), used["bs"]
