"""The one training loop every method uses: transformers Trainer + a peft LoRA student.

Loss is on response tokens only (labels are -100 on the prompt). Checkpoints are written every
``save_steps`` so an interrupted run resumes from the last one; the same seed gives the same adapter
on CPU. Methods differ only in how they build the PEFT model (initialisation) and, where needed, in
the loss (``Method.training_loss``, run by ``MethodTrainer``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pktransfer import signals
from pktransfer.config import LoraSpec, TrainingSpec
from pktransfer.data import IGNORE_INDEX, Example
from pktransfer.data.batching import pad
from pktransfer.errors import PktError
from pktransfer.fileio import write_json
from pktransfer.memory import release_memory
from pktransfer.ops.offload import input_device
from pktransfer.progress import Progress


def resolved_lora(spec: LoraSpec, arch: Any) -> LoraSpec:
    """``spec`` with its targets and rank pattern named as the student's modules are: the canonical per-role
    names (q_proj…) become a fused module's name (qkv_proj) where the family fuses them (Phi-3): one LoRA covers
    the whole fused matrix, so naming one of its roles trains all of them (``check_targets`` says so)."""
    from pktransfer.errors import RecipeError
    from pktransfer.models.arch import lora_ranks, lora_targets

    targets = lora_targets(arch.family, list(spec.target_modules))
    try:
        ranks = lora_ranks(arch.family, dict(spec.rank_pattern))
    except ValueError as err:
        raise RecipeError(f"lora.rank_pattern: {err}", hint="give every role of a fused module the same rank") from None
    return spec.model_copy(update={"target_modules": targets, "rank_pattern": ranks})


def merge_lora(model: Any) -> Any:
    """The PEFT model's LoRA merged into its base (``merge_and_unload``), then the memory that saving and merging
    freed handed back (:func:`pktransfer.memory.release_memory`): on CPU glibc kept it beside the evaluation that
    follows (0.26 GiB of a 0.5B student's)."""
    merged = model.merge_and_unload()
    release_memory()
    return merged


def merge_lora_exact(model: Any) -> Any:
    """The PEFT model's LoRA merged into its base the same way on every CPU: each weight becomes
    ``W + scaling * B @ A`` computed in float64 and rounded once to the weight's dtype. PEFT's merge multiplies
    ``B @ A`` in float32, whose summation order (so its last bits, so some bf16 roundings) depends on the CPU's
    kernels; in float64 the products of float32 factors are exact and the order changes nothing a bf16 weight can
    show. Used where the merged weights are an artefact others must reproduce (a planted teacher)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
                raise PktError(
                    f"merge_lora_exact merges LoRA on linear layers only, not {type(module).__name__}",
                    hint="target linear modules (lora.target_modules), or merge with PEFT's merge_and_unload",
                )
            if not isinstance(module, LoraLinear):
                continue
            base = module.get_base_layer()
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                delta = module.lora_B[name].weight.double() @ module.lora_A[name].weight.double()
                delta = (delta.T if module.fan_in_fan_out else delta) * module.scaling[name]
                base.weight.copy_((base.weight.double() + delta).to(base.weight.dtype))
    merged = model.unload()  # the LoRA modules dropped, their update already in the base weights
    release_memory()
    return merged


def lora_config(spec: LoraSpec, arch: Any, init: Any = None) -> Any:
    """The peft LoraConfig for ``spec`` on a student described by ``arch`` (targets named as its modules are);
    ``init`` overrides ``spec.init`` (methods that set weights themselves)."""
    from peft import LoraConfig

    spec = resolved_lora(spec, arch)
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
        rank_pattern=dict(spec.rank_pattern),
        init_lora_weights=init if init is not None else {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[spec.init],
    )


def check_targets(model: Any, spec: LoraSpec, arch: Any, log: Any = None) -> None:
    """Every LoRA target (named as ``resolved_lora`` names it for this student) exists in ``model``; ``log``
    hears which fused modules cover more roles than the recipe named."""
    from pktransfer.errors import RecipeError
    from pktransfer.models.arch import widened_targets

    for leaf, missing in widened_targets(arch.family, list(spec.target_modules)).items():
        if log:
            log(f"lora: {arch.family} fuses {leaf}; its LoRA also trains {', '.join(missing)} (one LoRA per fused matrix)")

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in resolved_lora(spec, arch).target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise RecipeError(
            f"lora.target_modules: {missing} not found in the student", hint=f"modules that exist: {', '.join(linear)}"
        )


def fast_path(model: Any) -> int:
    """Swap every LoRA dropout for :class:`~pktransfer.ops.dropout.GeometricDropout` (same p, same distribution,
    ~p·n random numbers per mask instead of n: CPU random numbers were a sixth of a bf16 step). Returns how many."""
    from pktransfer.ops.dropout import GeometricDropout

    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, d in drops.items():
                if type(d) is torch.nn.Dropout and d.p > 0:
                    drops[name] = GeometricDropout(d.p)
                    n += 1
    return n


# the fast path's attention kernel on CPU in bfloat16 (training.cpu_attention: auto): the math kernel up to this padded
# batch length, torch's flash kernel above. Measured on the offline student (bench/cpu_attention.py: LoRA step, batch
# 8, 2 cores, 2026-12-02): math 4.1 s / 2.8 GiB and flash 3.9 s / 2.7 GiB a step at 128 tokens, math 8.6 s / 6.0 GiB
# and flash 8.8 s / 5.3 GiB at 256, math 32.7 s / 11.8 GiB and flash 21.1 s / 9.1 GiB at 512; at the quickstart's
# ~50 tokens the flash backward was 8x its fp32 time (bench/train_step.py)
CPU_MATH_ATTENTION_MAX_LENGTH = 192


def cpu_attention_backends(setting: str, length: int) -> list[Any]:
    """The scaled-dot-product attention kernels the fast path allows for a bf16 training batch of ``length`` tokens
    (padded): ``math``, ``flash`` (with math as torch's fallback where flash cannot run), or ``auto`` by length."""
    from torch.nn.attention import SDPBackend

    if setting == "auto":
        setting = "math" if length <= CPU_MATH_ATTENTION_MAX_LENGTH else "flash"
    if setting == "math":
        return [SDPBackend.MATH]
    if setting == "flash":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    raise ValueError(f"training.cpu_attention: unknown setting {setting!r}")


@contextlib.contextmanager
def cpu_bf16_training(model: Any, attention: str = "auto", length: int = 0) -> Iterator[None]:
    """The training forward of a bfloat16 student on CPU, as mixed precision runs on a GPU: the fp32 LoRA weights
    are cast to bf16 per matmul (small) instead of every activation to fp32 (large, peft's default), and attention
    goes through the kernel :func:`cpu_attention_backends` picks for the batch's ``length`` (same function, other
    rounding order)."""
    from peft.helpers import disable_input_dtype_casting
    from torch.nn.attention import sdpa_kernel

    backends = cpu_attention_backends(attention, length)
    with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(model), sdpa_kernel(backends):
        yield


def response_ce(
    model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, Any, Any]:
    """The plain loss's sum of cross entropies over response tokens, the LM head applied only at the positions that
    predict one (a few of each row's: the head is a [V = 152k] matmul and softmax per position). Returns the sum,
    the number of response tokens and the model outputs (logits at those positions only). ``keep``: those positions
    where they are known already (``pkt plan``'s fake tensors cannot run :func:`kept_positions`' ``nonzero``)."""
    if keep is None:
        keep = kept_positions(labels)
    outputs = model(**inputs, logits_to_keep=keep)
    targets = labels[:, keep + 1].to(outputs.logits.device)
    total = torch.nn.functional.cross_entropy(
        outputs.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (targets != IGNORE_INDEX).sum(), outputs


class Collator:
    """Right-pads input_ids/labels; labels padded with -100 and masked out of the loss.

    ``index`` (each example's position in the training list) lets a method's loss look up per-example
    data such as cached teacher logits; the trainer removes it before the model's forward.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids, mask = pad([b["input_ids"] for b in batch], self.pad_id)
        labels, _ = pad([b["labels"] for b in batch], IGNORE_INDEX, width=ids.shape[1])
        index = torch.tensor([b.get("index", -1) for b in batch], dtype=torch.long)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "index": index}


def collate_examples(examples: list[Example], pad_id: int = 0, first_index: int = 0) -> dict[str, torch.Tensor]:
    """One padded batch of encoded examples; ``index`` counts from ``first_index`` (their place in a list)."""
    return Collator(pad_id)(
        [{"input_ids": e.input_ids, "labels": e.labels, "index": first_index + i} for i, e in enumerate(examples)]
    )


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.rows = [{"input_ids": e.input_ids, "labels": e.labels, "index": i} for i, e in enumerate(examples)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


# A method's own loss: (model outputs, batch with input_ids/attention_mask/labels/index, the number of
# response tokens in the whole accumulated batch or None) -> loss already divided by that number. A loss with the
# attribute ``response_logits = True`` reads response tokens only: the model's logits are then computed at
# ``batch["logits_positions"]`` alone (``logits_to_keep``; see :func:`response_rows`).
LossFn = Callable[[Any, dict[str, torch.Tensor], Any], torch.Tensor]


# A method's batch rewrite: (the model being trained, the batch) -> the batch the forward pass and the loss see
# (on-policy distillation puts the student's own samples here). Runs inside the training step, so it sees the
# weights of the current step.
BatchFn = Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, length-1]: positions whose logits predict a response token (next-token shift)."""
    return labels[:, 1:] != IGNORE_INDEX


def kept_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits predict a response token in some row: where the LM head must run (``logits_to_keep``)
    for a loss that reads response tokens only."""
    return response_positions(labels).any(0).nonzero().flatten()


def response_rows(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict a response token and those tokens, row-major ([N, V] and [N]). ``logits`` are at
    every position ([B, L, V], shifted here), or at the positions ``keep`` only ([B, K, V], from ``logits_to_keep``):
    the same rows in the same order either way, so a loss over them is the same to the bit."""
    if keep is None:
        mask = response_positions(labels)
        targets = labels[:, 1:]
        logits = logits[:, :-1]
    else:
        targets = labels[:, keep.to(labels.device) + 1]
        mask = targets != IGNORE_INDEX
    return logits[mask.to(logits.device)], targets[mask]


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross entropy over response tokens (the standard loss before normalisation); ``keep``: the
    logits are at those positions only (:func:`response_rows`).

    Only the response positions' logits are upcast to float32: a float32 copy of every position's logits (and its
    log-softmax and gradient) is batch x length x vocabulary x 4 bytes each, 2.5 GB for 8 x 512 tokens of a 152k
    vocabulary, where the responses of a multiple-choice task are a few tokens."""
    rows, targets = response_rows(logits, labels, keep)
    return torch.nn.functional.cross_entropy(rows.float(), targets.to(rows.device), reduction="sum")


def _trainer_class() -> Any:
    from transformers import Trainer

    class MethodTrainer(Trainer):
        """Trainer that drops the ``index`` column and, when a method brings its own loss, computes it."""

        method_loss: LossFn | None = None
        method_batch: BatchFn | None = None
        cpu_bf16_fast = False  # training.fast_path on a bfloat16 student on CPU
        cpu_attention = "auto"  # training.cpu_attention
        micro_batch_mean = False  # training.loss_averaging: micro_batch

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if not self.cpu_bf16_fast:
                return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # the kernel is chosen by the length of the batch as it comes (a method's batch rewrite, e.g. GKD's samples,
            # is bounded by it plus the sampled tokens)
            with cpu_bf16_training(model, self.cpu_attention, int(inputs["input_ids"].shape[1])):
                return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
            if self.micro_batch_mean:  # each micro-batch normalises over its own tokens; the trainer divides by GA
                num_items_in_batch = None
            if self.method_batch is not None:
                inputs = self.method_batch(model, inputs)
                if not getattr(self.method_batch, "keeps_tokens", False):
                    # the rewritten batch holds other tokens than the ones the trainer counted: the loss normalises
                    # over its own tokens, and the trainer divides by the accumulation steps
                    num_items_in_batch = None
            index = inputs.pop("index", None)
            if self.method_loss is None and self.cpu_bf16_fast:
                return self._response_ce(model, inputs, return_outputs, num_items_in_batch)
            if self.method_loss is None:
                if self.method_batch is not None or self.micro_batch_mean:
                    self.loss_is_scaled_for_ga = False
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            extra: dict[str, Any] = {}
            if getattr(self.method_loss, "response_logits", False):
                # the loss reads the logits that predict response tokens only: the LM head ([V = 152k] per position)
                # runs at those positions alone, and the batch says which (the GKD grid cells were OOM-killed at
                # 24 GiB holding the student's and the teacher's logits at every position)
                extra["logits_positions"] = keep = kept_positions(labels)
                outputs = model(**inputs, logits_to_keep=keep)
            else:
                outputs = model(**inputs)
            loss = self.method_loss(outputs, {**inputs, "labels": labels, "index": index, **extra}, num_items_in_batch)
            # normalised over the accumulated batch when the trainer told us its size
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            loss = self._across_processes(loss, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        def _across_processes(self, loss: Any, num_items_in_batch: Any) -> Any:
            """Several processes: the trainer counts ``num_items_in_batch`` over all of them and DDP averages their
            gradients, so a loss normalised by that count is scaled by the number of processes, as the trainer's own
            ``compute_loss`` does (without it every process's gradient is 1/N of the one-process gradient)."""
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                return loss * self.accelerator.num_processes
            return loss

        def _response_ce(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
            labels = inputs.pop("labels")
            total, n, outputs = response_ce(model, inputs, labels)
            self.loss_is_scaled_for_ga = num_items_in_batch is not None  # None after a batch rewrite (see above)
            if num_items_in_batch is not None:
                n = num_items_in_batch
            loss = self._across_processes(total / (n.to(total.device) if torch.is_tensor(n) else n), num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    return MethodTrainer


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float | None
    log_history: list[dict[str, Any]]
    resumed_from: str | None
    trainable_parameters: int = 0
    tokens_seen: int | None = None  # non-padding input tokens the optimizer's batches held (trainer state)


def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _progress_callback(progress: Progress) -> Any:
    from transformers import TrainerCallback

    class RichProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self._ctx: Any = None
            self._advance: Any = None
            self._loss: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._ctx = progress.task("train", total=state.max_steps, done=state.global_step)
            self._advance = self._ctx.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            fields = {"loss": f"{self._loss:.4f}"} if self._loss is not None else {}
            self._advance(1, **fields)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self._loss = float(logs["loss"])

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self._ctx is not None:
                self._ctx.__exit__(None, None, None)
                self._ctx = None

    return RichProgressCallback()


def _heap_trim_callback() -> Any:
    """After every optimizer step on CPU, glibc's heaps hand their free pages back (:func:`pktransfer.memory.trim_heap`):
    a step's freed activations otherwise stay in the process from step to step."""
    from transformers import TrainerCallback

    from pktransfer.memory import trim_heap

    class HeapTrimCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            trim_heap()

    return HeapTrimCallback()


def warmup_kwargs(ratio: float) -> dict[str, float]:
    """A warmup given as a share of the steps, under this transformers version's name: 4.x has
    ``warmup_ratio`` (its ``warmup_steps`` is a step count: a float there would silently mean ~0 steps);
    5.x dropped ``warmup_ratio`` and reads a float ``warmup_steps`` < 1 as a ratio."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"warmup_ratio": ratio} if "warmup_ratio" in fields else {"warmup_steps": ratio}


def _tokens_kwargs() -> dict[str, Any]:
    from transformers import TrainingArguments

    return (
        {"include_num_input_tokens_seen": "non_padding"}
        if "include_num_input_tokens_seen" in TrainingArguments.__dataclass_fields__
        else {}
    )


def _checkpointing_kwargs(enabled: bool) -> dict[str, bool]:
    """Activation checkpointing under whichever name this transformers version uses."""
    from transformers import TrainingArguments

    if not enabled:
        return {}
    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def unwrapped(model: Any) -> Any:
    """The model inside a ``DistributedDataParallel`` wrapper (the trainer hands methods the wrapped model when several
    processes train), else the model itself: generation and a method's own modules live on the inner one."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, as ``torchrun`` / ``accelerate launch`` set them."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch(spec: TrainingSpec, world: int) -> int:
    """``training.batch_size`` is the global batch: each of ``world`` processes takes an equal share, so a recipe
    trains the same model on one process or several."""
    from pktransfer.errors import RecipeError

    if spec.batch_size % world:
        raise RecipeError(
            f"training.batch_size {spec.batch_size} does not split evenly over {world} processes",
            hint=f"use a batch size divisible by {world} (training.batch_size is the global batch)",
        )
    return spec.batch_size // world


def total_steps(spec: TrainingSpec, n_examples: int) -> int | None:
    """The optimiser steps to take when the recipe fixes them (``max_steps``, or ``steps_per_epoch: floor``), else
    None (the trainer counts ``epochs`` with a partial last window per epoch)."""
    if spec.max_steps is not None:
        return spec.max_steps
    if spec.steps_per_epoch == "floor":
        per_epoch = max(math.ceil(n_examples / spec.batch_size) // spec.grad_accum, 1)
        return math.ceil(spec.epochs * per_epoch)
    return None


def train(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    spec: TrainingSpec,
    *,
    output_dir: Path,
    seed: int,
    progress: Progress | None = None,
    callbacks: list[Any] | None = None,
    loss: LossFn | None = None,
    batch: BatchFn | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train ``model`` (a PeftModel) on ``examples``; checkpoints go to ``output_dir``."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    progress = progress or Progress(quiet=True)
    device = input_device(model)
    _, world = rank_and_world()
    resume = resume and world == 1  # several processes always train from the start, in step with each other
    cpu_fast = spec.fast_path and device.type == "cpu"
    fused = cpu_fast and spec.fused_step
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device_batch(spec, world),
        gradient_accumulation_steps=spec.grad_accum,
        num_train_epochs=spec.epochs,
        max_steps=total_steps(spec, len(examples)) or -1,
        learning_rate=spec.lr,
        weight_decay=spec.weight_decay,
        **warmup_kwargs(spec.warmup_ratio),
        **_tokens_kwargs(),
        lr_scheduler_type=spec.scheduler,
        logging_steps=spec.logging_steps,
        save_strategy="steps",
        save_steps=spec.save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        report_to=[],
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16,
        **_checkpointing_kwargs(spec.gradient_checkpointing),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # the fast path's fused step on CPU: torch's fused AdamW kernel (the per-tensor loop cost 30 ms a step, 9 ms fused)
        optim="adamw_torch_fused" if fused else "adamw_torch",
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=ListDataset(examples),
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=[*(callbacks or []), signals.stop_callback()],
    )
    trainer.method_loss = loss
    trainer.method_batch = batch
    trainer.micro_batch_mean = spec.loss_averaging == "micro_batch"
    if cpu_fast:
        fast_path(model)
        if fused:
            from pktransfer.ops.fused_lora import fuse_lora_layers

            fuse_lora_layers(model)
        trainer.cpu_bf16_fast = any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
        trainer.cpu_attention = spec.cpu_attention
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(progress))
    if device.type == "cpu":
        trainer.add_callback(_heap_trim_callback())
    resume_from = last_checkpoint(output_dir) if resume else None
    if resume_from:
        progress.log(f"resuming training from {resume_from}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    t0 = time.perf_counter()
    with signals.deferred():  # SIGTERM / SIGINT: checkpoint at the end of this step, then stop (resumable)
        trainer.train(resume_from_checkpoint=resume_from)
    model.eval()
    history = list(trainer.state.log_history)
    # fewer steps than logging_steps log no "loss": the trainer's closing mean (train_loss) stands in
    losses = [h["loss"] for h in history if "loss" in h] or [h["train_loss"] for h in history if "train_loss" in h]
    write_json(output_dir / "log_history.json", history)
    seen = getattr(trainer.state, "num_input_tokens_seen", None)
    return TrainResult(
        trainer.state.global_step,
        time.perf_counter() - t0,
        losses[-1] if losses else None,
        history,
        resume_from,
        trainable,
        int(seen) if seen else None,
    )
