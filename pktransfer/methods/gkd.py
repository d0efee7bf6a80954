"""On-policy distillation, GKD (Agarwal et al., ICLR 2024), as TRL's ``GKDTrainer`` runs it, on the shared loop.

The student is a LoRA (or any start, composed: ``methods/compose.py``) trained only toward the teacher:

1. Each training batch, with probability ``lmbda`` (one draw per batch, Python's ``random`` as in TRL), is
   replaced by the student's own samples: its prompts are decoded by the student *with the weights of the
   current step* (sampling at ``temperature``, top-k 0, top-p 1, up to ``max_new_tokens``), each completion
   kept up to and including its first stop token. Otherwise, with ``seq_kd``, the teacher's samples replace
   the gold responses (sequence-level KD); otherwise the gold responses stay.
2. The teacher scores exactly the tokens the student is trained on (its forward pass over the same batch).
3. Loss: the generalized Jensen-Shannon divergence (``ops.distill.generalized_jsd``; ``beta`` 0 forward KL,
   1 reverse KL) between the two next-token distributions at every completion token, summed and divided by
   the number of those tokens in the batch.

Where this deliberately differs from TRL (1.16, ``trl/experimental/gkd``), each for a stated reason:

- Samples are drawn with the student in eval mode (no dropout). TRL's default ``disable_dropout: true`` makes
  that the same; with ``disable_dropout: false`` TRL would sample with dropout active, which is not the
  policy being distilled.
- A sampled batch is re-assembled right-padded (prompt, completion, padding) rather than kept left-padded, so
  positions match the gold batches' (a left-padded row's position ids would start at its padding).
- The loss is divided by the completion tokens of the batch actually trained on; TRL divides by the gold
  batch's token count, which the trainer counted before the samples replaced it.
- ``max_new_tokens`` defaults to the task's own generation budget (TRL: 128), so samples have the length the
  evaluation allows.

Logits are compared over the shared tokenizer's vocabulary, so a teacher whose output layer is padded to
another size (Qwen2.5 7B+ against 0.5-3B) is accepted; tokenizers that differ are refused.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field

from pktransfer.config import MethodConfig
from pktransfer.data import IGNORE_INDEX
from pktransfer.data.batching import pad
from pktransfer.errors import RecipeError
from pktransfer.evaluation.generation import contiguous_head_input
from pktransfer.methods.base import MethodContext, ObjectiveMethod
from pktransfer.methods.teacher_cache import live_teacher
from pktransfer.models.pair import check_pair
from pktransfer.ops.distill import generalized_jsd
from pktransfer.ops.offload import input_device
from pktransfer.training import BatchFn, LossFn, response_positions, response_rows, unwrapped


@contextmanager
def pure_policy(model: Any) -> Iterator[None]:
    """Sample from the model's own distribution: while decoding, the model's ``generation_config`` (a checkpoint's
    repetition penalty, top-k, suppressed tokens, ...) is replaced by transformers' global defaults, so only the
    settings the call passes apply (``generate`` fills every setting the call leaves unset from it)."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's transformers model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


# ---- the loss and the sampled batch (pure functions) ----------------------------------------------------


def gkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean generalized JSD over the positions that predict a label (student/teacher logits [B, L, V], labels
    [B, L] with −100 elsewhere); TRL's ``generalized_jsd_loss`` with ``reduction="batchmean"`` on shifted logits.
    ``keep``: the logits are at those positions only ([B, K, V]); the same value to the bit."""
    s_rows, _ = response_rows(student_logits, labels, keep)
    t_rows, _ = response_rows(teacher_logits, labels, keep)
    jsd = generalized_jsd(s_rows, t_rows.to(s_rows.device), beta, temperature)
    return jsd.sum() / response_positions(labels).sum().clamp_min(1)


def prompts_of(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each right-padded row's prompt: its tokens before the first labelled (response) position."""
    out = []
    for ids, lab, m in zip(input_ids.tolist(), labels.tolist(), attention_mask.tolist(), strict=True):
        n = sum(m)
        first = next((j for j in range(n) if lab[j] != IGNORE_INDEX), n)
        out.append(ids[:first])
    return out


def completion_tokens(generated: list[int], stop_ids: set[int]) -> list[int]:
    """A sample's tokens up to and including its first stop token (TRL masks everything after it)."""
    for j, t in enumerate(generated):
        if t in stop_ids:
            return generated[: j + 1]
    return generated


def sampled_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, max_length: int, index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows, labels on the completion only, cut at ``max_length``."""
    rows = [(p + c)[:max_length] for p, c in zip(prompts, completions, strict=True)]
    labels = [([IGNORE_INDEX] * len(p) + c)[:max_length] for p, c in zip(prompts, completions, strict=True)]
    ids, mask = pad(rows, pad_id)
    lab, _ = pad(labels, IGNORE_INDEX, width=ids.shape[1])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab, "index": index}


# ---- the method -----------------------------------------------------------------------------------------


class GkdConfig(MethodConfig):
    """On-policy distillation (GKD; TRL's GKDTrainer): generalized JSD to the teacher on a mix of the student's own
    samples (a share ``lmbda`` of the batches) and the gold responses."""

    name: Literal["gkd"] = "gkd"
    lmbda: float = Field(default=0.5, ge=0, le=1, description="share of batches replaced by the student's samples (TRL: 0.5)")
    beta: float = Field(default=0.5, ge=0, le=1, description="generalized JSD interpolation: 0 forward KL, 1 reverse KL")
    temperature: float = Field(default=0.9, gt=0, description="sampling temperature of the on-policy samples (TRL: 0.9)")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="longest sample (None: the task's generation budget; TRL's default is 128)"
    )
    seq_kd: bool = Field(default=False, description="batches not sampled by the student are sampled by the teacher")
    loss_temperature: float = Field(default=1.0, gt=0, description="softmax temperature inside the divergence (TRL: 1)")
    disable_dropout: bool = Field(default=True, description="train with the LoRA's dropout off, as TRL's default does")
    sampler: Literal["auto", "hf", "vllm"] = Field(
        default="auto",
        description="the student's on-policy samples: hf (the training model's generate), vllm (vLLM's engine, handed "
        "the student's current LoRA before every sampled batch; docs/evaluation.md, 'vLLM'), or auto: as "
        "evaluation.backend resolves (vllm on CUDA where installed, else hf)",
    )


class GkdMethod(ObjectiveMethod):
    config_class = GkdConfig
    needs_teacher = True
    teacher_use = "outputs"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.teacher: Any = None
        self.vocab = 0
        self.stats = {"batches": 0, "student_sampled_batches": 0, "teacher_sampled_batches": 0}
        self.generated = {"student": [0, 0.0], "teacher": [0, 0.0]}  # tokens, seconds
        self.samples: list[dict[str, Any]] = []  # the first few on-policy samples, for reading by eye
        self._sampled = False  # the batch the loss sees was sampled by the student
        self._progress: Any = None
        self.engine = "hf"  # the student's sampler, resolved when training starts
        self._vllm: Any = None  # vllm_backend.LoraSampler when it is vllm

    @property
    def teacher_during_training(self) -> bool:
        return True

    def setup_objective(self, ctx: MethodContext, model: Any) -> None:
        teacher = ctx.load_teacher()
        student = ctx.student
        check_pair(teacher.arch, student.arch, teacher.tokenizer, student.tokenizer, self.name, padded_vocab=True)
        self.teacher = teacher
        self.vocab = min(student.arch.vocab_size, teacher.arch.vocab_size, len(student.tokenizer))
        if self.spec.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0

    # ---- sampling ---------------------------------------------------------------------------------------

    def _sample(self, model: Any, prompts: list[list[int]], ctx: MethodContext, who: str) -> list[list[int]]:
        """Decode every prompt once with ``model`` (sampling), returning completions cut after their stop token."""
        tok = ctx.student.tokenizer
        stop = ctx.formatter.stop_token_ids()
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
        ids, mask = pad(prompts, pad_id, side="left")
        device = input_device(model)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), contiguous_head_input(model), pure_policy(model):  # the LM head: see there
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    **self.sampling(),
                    eos_token_id=list(stop),
                    pad_token_id=pad_id,
                )
        finally:
            model.train(was_training)
        completions = [completion_tokens(row, set(stop)) for row in out[:, ids.shape[1] :].cpu().tolist()]
        n_new, seconds = sum(len(c) for c in completions), time.perf_counter() - t0
        self.generated[who][0] += n_new
        self.generated[who][1] += seconds
        if who == "teacher":
            ctx.teacher_work.add(
                "teacher samples (seq_kd)",
                forward_tokens=int(mask.sum()) + n_new,
                seconds=seconds,
                parameters=self.teacher.arch.n_parameters,
            )
        return completions

    def _sample_vllm(self, engine: Any, prompts: list[list[int]], ctx: MethodContext) -> list[list[int]]:
        """The student's samples through vLLM, from its current LoRA (the sync's time counted with the sampling)."""
        t0 = time.perf_counter()
        out = engine.sample(
            prompts, temperature=self.spec.temperature, max_new_tokens=self.max_new_tokens,
            stop_token_ids=ctx.formatter.stop_token_ids(),
        )  # fmt: skip
        stop = set(ctx.formatter.stop_token_ids())
        completions = [completion_tokens(c, stop) for c in out]
        self.generated["student"][0] += sum(len(c) for c in completions)
        self.generated["student"][1] += time.perf_counter() - t0
        return completions

    def sampling(self) -> dict[str, Any]:
        """Every setting of the samplers' decoding, explicit (recorded in run.json under ``method.sampling``): the
        policy itself at ``temperature``, nothing else reshaping it."""
        return {
            "do_sample": True,
            "temperature": self.spec.temperature,
            "top_k": 0,
            "top_p": 1.0,
            "min_p": None,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": 0,
        }

    def _vllm_sampler(self, model: Any, ctx: MethodContext) -> Any:
        """The vLLM sampler of ``model`` (started at the first sampled batch), or None where the sampler is hf."""
        from pktransfer.evaluation import vllm_backend
        from pktransfer.training import rank_and_world

        setting = self.spec.sampler if self.spec.sampler != "auto" else ctx.recipe.evaluation.backend
        self.engine = vllm_backend.resolve(setting, input_device(model).type)
        if self.engine != "vllm":
            return None
        if rank_and_world()[1] > 1:
            raise RecipeError(
                "gkd sampler vllm runs one engine per process; it is not set up for several processes",
                hint="run it as one process, or set method.sampler: hf for torchrun / accelerate launch",
            )
        if self._vllm is None:
            recipe = ctx.recipe
            self._vllm = vllm_backend.LoraSampler(
                model, ctx.student.tokenizer, ctx.workdir / "vllm_sampler", str(ctx.student.dtype).removeprefix("torch."),
                recipe.training.max_length + self.max_new_tokens, recipe.seed,
            )  # fmt: skip
        return self._vllm

    def training_batch(self, ctx: MethodContext) -> BatchFn:
        spec = self.spec
        self.max_new_tokens = spec.max_new_tokens or ctx.task.max_new_tokens or 16
        self._progress = ctx.progress
        max_length = ctx.recipe.training.max_length
        tok = ctx.student.tokenizer

        def rewrite(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            self.stats["batches"] += 1
            on_policy = random.random() <= spec.lmbda  # TRL's draw, one per batch
            if not on_policy and not spec.seq_kd:
                return batch
            who = "student" if on_policy else "teacher"
            sampler = unwrapped(model) if on_policy else self.teacher.model  # DDP's wrapper cannot generate
            prompts = prompts_of(batch["input_ids"], batch["labels"], batch["attention_mask"])
            engine = self._vllm_sampler(sampler, ctx) if on_policy else None
            if engine is not None:
                completions = self._sample_vllm(engine, prompts, ctx)
            else:
                completions = self._sample(sampler, prompts, ctx, who)
            self.stats[f"{who}_sampled_batches"] += 1
            self._sampled = on_policy
            new = sampled_batch(prompts, completions, tok.pad_token_id or 0, max_length, batch["index"])
            return {k: v.to(batch["input_ids"].device) for k, v in new.items()}

        return rewrite

    # ---- the loss ---------------------------------------------------------------------------------------

    def training_loss(self, ctx: MethodContext) -> LossFn:
        spec = self.spec

        def loss(outputs: Any, batch: dict[str, torch.Tensor], n_tokens: Any) -> torch.Tensor:
            # both models' logits only where a response token is predicted (None: at every position)
            keep = batch.get("logits_positions")
            logits = outputs.logits[..., : self.vocab]
            what = "live teacher logits on every training batch (the student's samples included)"
            t_out = live_teacher(ctx, self.teacher, batch, what, **({} if keep is None else {"logits_to_keep": keep}))
            t_logits = t_out.logits[..., : self.vocab].to(logits.device)
            if self._sampled and len(self.samples) < 8:
                self._keep_sample(ctx, batch, logits, t_logits, keep)
            self._sampled = False
            labels = batch["labels"]
            return gkd_loss(logits, t_logits, labels, beta=spec.beta, temperature=spec.loss_temperature, keep=keep)

        loss.response_logits = True  # type: ignore[attr-defined]
        return loss

    @torch.no_grad()
    def _keep_sample(
        self,
        ctx: MethodContext,
        batch: dict[str, torch.Tensor],
        logits: torch.Tensor,
        t_logits: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> None:
        """The batch's first on-policy sample, for reading by eye: each sampled token with the student's and the
        teacher's log-probability of it and the token's divergence (what the loss averages). The logits are at the
        positions ``keep``."""
        tok = ctx.student.tokenizer
        labels = batch["labels"]
        if keep is None:
            keep = torch.arange(labels.shape[1] - 1)
        targets = labels[0, keep.to(labels.device) + 1]
        pos = (targets != IGNORE_INDEX).nonzero().flatten()  # kept positions predicting a sampled token
        s_lp = torch.log_softmax(logits[0, pos].float(), -1)
        t_lp = torch.log_softmax(t_logits[0, pos].float(), -1)
        ids = targets[pos]
        jsd = generalized_jsd(logits[0, pos], t_logits[0, pos], self.spec.beta, self.spec.loss_temperature)
        first = int(keep[pos[0]]) + 1 if len(pos) else 0
        self.samples.append(
            {
                "prompt": tok.decode(batch["input_ids"][0, :first]),
                "sample": tok.decode(ids),
                "tokens": [
                    {
                        "token": tok.decode([int(t)]),
                        "student_logprob": round(float(s_lp[j, t]), 4),
                        "teacher_logprob": round(float(t_lp[j, t]), 4),
                        "jsd": round(float(jsd[j]), 4),
                    }
                    for j, t in enumerate(ids.tolist())
                ],
            }
        )

    def finish_training(self) -> None:
        self.teacher = None
        if self._vllm is not None:  # the engine's memory goes back before the evaluation
            self._vllm.close()
            self._vllm = None
        if (
            self._progress is not None
            and self.spec.lmbda > 0
            and self.stats["batches"]
            and not self.stats["student_sampled_batches"]
        ):
            self._progress.warn(
                f"gkd: none of the {self.stats['batches']} training batches was sampled on-policy (lmbda "
                f"{self.spec.lmbda}): this run distilled on the gold responses only (run.json: on_policy_batches 0)"
            )

    def spent(self) -> dict[str, Any]:
        tokens, seconds = self.generated["student"]
        return {
            "student_generated_tokens": tokens,
            "student_generation_seconds": round(seconds, 2),
            "on_policy_batches": self.stats["student_sampled_batches"],
        }

    def report(self) -> dict[str, Any]:
        t_tokens, t_seconds = self.generated["teacher"]
        return {
            **self.stats,
            "teacher_generated_tokens": t_tokens,
            "teacher_generation_seconds": round(t_seconds, 2),
            "max_new_tokens": getattr(self, "max_new_tokens", None),
            "sampler": self.engine,
            "sampling": {**self.sampling(), "model_generation_config": "ignored: sampled from a fresh GenerationConfig"}
            if hasattr(self, "max_new_tokens")
            else None,
            "first_samples": self.samples,
        }
