"""Baseline: logit knowledge distillation into a LoRA student (methods.md §4).

Same data, steps and LoRA as every other method; only the loss differs. On the response tokens:

    loss = (1 − α) · CE(student, labels) + α · T² · KL(softmax(z_T / T) ‖ softmax(z_S / T))

summed over response positions and divided by their number (the same normalisation as the plain
cross entropy, so gradient accumulation behaves identically).

Teacher logits come either from the teacher in memory (``cache: false``: the full distribution at
every step) or from a cache computed once before training (``cache: true``, the default): for each
response position the teacher's ``top_k`` largest logits and their token ids. The cached teacher
distribution is the softmax over those k logits; top-k by logit does not depend on the temperature,
so one cache serves every T. With ``top_k`` equal to the vocabulary (or None) the two paths give the
same loss. The cache file is keyed by the teacher, the token ids and k, so runs that share a folder
(``method.logits_cache``, as ``pkt compare`` does) compute it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from pktransfer.config import MethodConfig
from pktransfer.methods.base import MethodContext, ObjectiveMethod, SharedWork
from pktransfer.methods.teacher_cache import PerExampleCache, live_teacher, teacher_logits_cache
from pktransfer.models.pair import check_pair
from pktransfer.ops.distill import kl_to_teacher
from pktransfer.training import LossFn, response_positions, response_rows

# ---- the loss (pure functions) --------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    n_tokens: int | torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """(1 − α)·CE + α·T²·KL over response tokens, divided by ``n_tokens`` (default: this batch's count).

    student_logits [B, L, V], or [B, K, V] at the positions ``keep`` only (``logits_to_keep``, see
    ``response_rows``: the same rows, the same value); labels [B, L] (−100 outside responses); teacher_logits
    [P, K] for the P response positions of the batch in row-major order (see ``response_positions``).
    """
    n = response_positions(labels).sum() if n_tokens is None else n_tokens
    rows, targets = response_rows(student_logits, labels, keep)
    ce = torch.nn.functional.cross_entropy(rows.float(), targets.to(rows.device), reduction="sum")
    kl = kl_to_teacher(rows, teacher_logits, temperature, teacher_ids).sum()
    return ((1 - alpha) * ce + alpha * temperature**2 * kl) / n


# ---- the method -----------------------------------------------------------------------------------


class KdConfig(MethodConfig):
    """Baseline: LoRA student trained with (1 − alpha)·CE + alpha·T²·KL(teacher_T ‖ student_T) on response tokens."""

    name: Literal["kd"] = "kd"
    temperature: float = Field(default=2.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the KL term (1: distillation only)")
    cache: bool = Field(
        default=True,
        description="precompute the teacher's logits once and free the teacher; "
        "false keeps the teacher in memory and uses its full distribution",
    )
    top_k: int | None = Field(default=64, ge=1, description="cached logits per position (None: the whole vocabulary)")
    logits_cache: str | None = Field(default=None, description="folder for cached teacher logits (shared by runs)")


class KdMethod(ObjectiveMethod):
    config_class = KdConfig
    needs_teacher = True
    teacher_use = "outputs"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.cache: PerExampleCache | None = None
        self.teacher: Any = None
        self.vocab = 0

    @property
    def teacher_during_training(self) -> bool:
        return not self.spec.cache

    def setup_objective(self, ctx: MethodContext, model: Any) -> None:
        spec, student = self.spec, ctx.student
        # the shared tokenizer's size; lm_heads may be padded beyond it differently
        self.vocab = min(student.arch.vocab_size, len(student.tokenizer))
        if spec.cache:
            folder = Path(spec.logits_cache) if spec.logits_cache else ctx.workdir / "teacher_logits"

            def teacher_and_vocab() -> tuple[Any, int]:
                teacher = self._teacher(ctx)
                return teacher, self.vocab

            # a cache hit needs no teacher at all (the key holds the teacher spec and the student's vocabulary)
            self.cache = teacher_logits_cache(ctx, folder, spec.top_k, teacher_and_vocab)
        else:
            self.teacher = self._teacher(ctx)

    @classmethod
    def shared_work(cls, recipe: Any, shared_root: Path) -> SharedWork:
        """Every KD cell of a grid reads one logits cache (keyed by teacher, token ids and k)."""
        return SharedWork.cache(recipe, "logits_cache", shared_root / "kd-logits")

    def _teacher(self, ctx: MethodContext) -> Any:
        teacher = ctx.load_teacher()
        check_pair(teacher.arch, ctx.student.arch, teacher.tokenizer, ctx.student.tokenizer, "kd", padded_vocab=True)
        self.vocab = min(self.vocab, teacher.arch.vocab_size)
        return teacher

    def training_loss(self, ctx: MethodContext) -> LossFn:
        spec = self.spec

        def loss(outputs: Any, batch: dict[str, torch.Tensor], n_tokens: Any) -> torch.Tensor:
            logits = outputs.logits[..., : self.vocab]
            labels = batch["labels"]
            keep = batch.get("logits_positions")  # the positions the logits were computed at (response_logits)
            if self.cache is not None:
                index = batch["index"].tolist()
                t_vals = self.cache.rows("values", index).to(logits.device)
                t_ids = self.cache.rows("ids", index).to(logits.device)
            else:
                what = "live teacher logits at every training batch"
                t_out = live_teacher(ctx, self.teacher, batch, what, **({} if keep is None else {"logits_to_keep": keep}))
                t_vals, _ = response_rows(t_out.logits[..., : self.vocab], labels, keep)
                t_vals = t_vals.to(logits.device)
                t_ids = None
            return kd_loss(
                logits, labels, t_vals, t_ids, temperature=spec.temperature, alpha=spec.alpha, n_tokens=n_tokens, keep=keep
            )

        loss.response_logits = True  # type: ignore[attr-defined]  # the LM head runs where the loss reads
        return loss
