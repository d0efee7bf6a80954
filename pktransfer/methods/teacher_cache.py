"""Teacher outputs computed once and read per example: KD's top-k logits, SemAlign's layer targets.

A cache is one safetensors file: tensors whose rows are the response positions of every training example,
concatenated, plus ``offsets`` [N + 1] (example i owns rows ``offsets[i]:offsets[i + 1]``). The file is
named by a hash of everything its contents depend on, written atomically, and read memory-mapped, so a
grid's cells share it and a training step reads only its batch's rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pktransfer.data import Example
from pktransfer.errors import DataError
from pktransfer.methods.base import TeacherWork, n_tokens
from pktransfer.ops.offload import input_device
from pktransfer.progress import Progress
from pktransfer.training import collate_examples, response_positions

if TYPE_CHECKING:
    from pktransfer.methods.base import MethodContext


def vocab_digest(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary (token -> id): cached teacher outputs are only valid for it."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def teacher_identity(recipe: Any, tokenizer: Any) -> str:
    """The teacher as a cache depends on it: its recipe section and the (shared) vocabulary."""
    return json.dumps(recipe.teacher.identity(), sort_keys=True) + vocab_digest(tokenizer)


def cache_key(teacher: str, extra: str, examples: list[Example]) -> str:
    """Hash of what a cached teacher output depends on: the teacher, the method's settings, the token ids
    and labels of every example."""
    h = hashlib.sha256(f"{teacher}|{extra}".encode())
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:20]


def cost_file(path: Path) -> Path:
    """Where a cache file's build cost is kept: ``prefix-key.cost.json`` beside ``prefix-key.safetensors``."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".cost.json")


def cached_file(
    folder: Path,
    prefix: str,
    key: str,
    compute: Callable[[], dict[str, Any]],
    progress: Progress,
    work: TeacherWork | None = None,
) -> Path:
    """``folder/prefix-key.safetensors``, computed by ``compute()`` unless a readable copy exists.

    Written to a temporary name and renamed, so runs sharing the folder never see a half-written file.

    ``work``: the run's teacher work. What ``compute()`` adds to it is taken out again and kept in the cache's own
    cost file (:func:`cost_file`), and the run notes the cache (``work.caches``) whether it built or reused it: a
    report shares the cost between the entries whose runs read the cache, so it is counted once even when the run
    that built it never finished (a killed attempt whose successor found the cache)."""
    from safetensors import SafetensorError, safe_open

    from pktransfer.fileio import save_safetensors, write_json

    path = folder / f"{prefix}-{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
            progress.log(f"{prefix}: reusing {path}")
            if work is not None:
                kept = cost_file(path)
                work.cache_used(path.name, built=False, cost=json.loads(kept.read_text()) if kept.is_file() else None)
            return path
        except (SafetensorError, OSError, RuntimeError):
            progress.log(f"{prefix}: {path} is unreadable; recomputing it")
    before = deepcopy(work) if work is not None else None
    tensors = compute()
    save_safetensors(tensors, path)
    if work is not None and before is not None:
        spent = TeacherWork(
            forward_tokens=work.forward_tokens - before.forward_tokens,
            backward_tokens=work.backward_tokens - before.backward_tokens,
            seconds=work.seconds - before.seconds,
            parameters=work.parameters,
            what=[w for w in work.what if w not in before.what],
        ).to_dict()
        write_json(cost_file(path), spent)
        work.forward_tokens, work.backward_tokens = before.forward_tokens, before.backward_tokens
        work.seconds, work.parameters, work.what = before.seconds, before.parameters, before.what
        work.cache_used(path.name, built=True, cost=spent)
    return path


def pack_per_example(counts: Sequence[int], parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-batch row blocks and add ``offsets`` from each example's row count."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(list(counts), dtype=torch.long), 0)
    packed = {name: torch.cat(blocks) for name, blocks in parts.items()}
    for name, t in packed.items():
        if t.shape[0] != int(offsets[-1]):
            raise ValueError(f"{name} holds {t.shape[0]} rows, the examples' counts add up to {int(offsets[-1])}")
    return {"offsets": offsets, **packed}


class PerExampleCache:
    """Reads a packed cache lazily: ``rows(name, index)`` gives the rows of the examples in ``index``."""

    def __init__(self, path: Path, n_examples: int, what: str) -> None:
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(str(path), framework="pt")
        self.offsets = self._file.get_tensor("offsets")
        if len(self.offsets) != n_examples + 1:
            raise DataError(
                f"{what}: the cached file holds {len(self.offsets) - 1} examples, training has {n_examples}",
                hint=f"delete {path} and rerun",
            )

    def rows(self, name: str, index: Sequence[int]) -> torch.Tensor:
        sl = self._file.get_slice(name)
        # outside CPU autocast: the training fast path's bf16 autocast refuses to concatenate float16 rows (the stored
        # dtype of SemAlign's targets), and rows are data, not a computation to run in lower precision
        with torch.autocast("cpu", enabled=False):
            return torch.cat([sl[int(self.offsets[i]) : int(self.offsets[i + 1])] for i in index])


# ---- the teacher's next-token distribution (KD, SemAlign's ``output_loss: kl``) ------------------------


@torch.no_grad()
def teacher_logits_at_responses(
    teacher_model: Any, examples: list[Example], top_k: int | None, vocab: int, batch_size: int, progress: Progress
) -> dict[str, torch.Tensor]:
    """Top-k teacher logits (float32) and ids (int32) at each example's response positions, with offsets."""
    device = input_device(teacher_model)
    values, ids, counts = [], [], []
    with progress.task("teacher logits", total=len(examples)) as advance:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate_examples(chunk)
            logits = teacher_model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits[..., :vocab]
            mask = response_positions(batch["labels"]).to(device)
            picked = logits[:, :-1][mask].float()
            k = vocab if top_k is None else min(top_k, vocab)
            top = picked.topk(k, dim=-1, sorted=True)
            values.append(top.values.cpu())
            ids.append(top.indices.to(torch.int32).cpu())
            counts.extend(int(m.sum()) for m in mask)
            advance(len(chunk))
    return pack_per_example(counts, {"values": values, "ids": ids})


def teacher_logits_cache(
    ctx: MethodContext, folder: Path, top_k: int | None, teacher_and_vocab: Callable[[], tuple[Any, int]]
) -> PerExampleCache:
    """The teacher's top-k logits at every training example's response positions, computed once per key.

    The file is named by the teacher, the shared vocabulary and k, so KD cells and SemAlign's KL output loss
    in one grid read one file. ``teacher_and_vocab()`` is called only on a cache miss.
    """
    examples = ctx.examples
    key = cache_key(teacher_identity(ctx.recipe, ctx.student.tokenizer), f"top_k={top_k}", examples)

    def compute() -> dict[str, torch.Tensor]:
        teacher, vocab = teacher_and_vocab()
        t0 = time.perf_counter()
        out = teacher_logits_at_responses(teacher.model, examples, top_k, vocab, ctx.recipe.training.batch_size, ctx.progress)
        ctx.teacher_work.add(
            f"teacher logits for {len(examples)} training examples (cached for the grid)",
            forward_tokens=n_tokens(examples),
            seconds=time.perf_counter() - t0,
            parameters=teacher.arch.n_parameters,
        )
        return out

    path = cached_file(folder, "kd-logits", key, compute, ctx.progress, ctx.teacher_work)
    return PerExampleCache(path, len(examples), "teacher logits")


# ---- the teacher run live at every training batch (kd without a cache, gkd, hidden_kd) ------------------------------


@torch.no_grad()
def live_teacher(ctx: MethodContext, teacher: Any, batch: dict[str, torch.Tensor], what: str, **kwargs: Any) -> Any:
    """The teacher's forward pass over a training batch (``kwargs``: e.g. ``output_hidden_states``), its tokens and
    seconds counted in ``ctx.teacher_work`` under ``what``."""
    dev = input_device(teacher.model)
    t0 = time.perf_counter()
    out = teacher.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), **kwargs)
    ctx.teacher_work.add(
        what,
        forward_tokens=int(batch["attention_mask"].sum()),
        seconds=time.perf_counter() - t0,
        parameters=teacher.arch.n_parameters,
    )
    return out
