"""Baseline: layer-wise hidden-state distillation (TinyBERT's hidden-state loss; the baseline SemAlign's reviewers
asked for), on a LoRA student (or any start, composed: ``methods/compose.py``).

1. Pairing: student layer i is supervised by teacher layer g(i). ``uniform`` spreads the student's layers
   evenly over the teacher's depth (``ops.distill.uniform_layer_pairs``, the last layers meet); or a list of
   ``[student, teacher]`` pairs.
2. A learned linear projection W maps the student's hidden size to the teacher's (TinyBERT's W_h: one for all
   pairs, or one per pair), trained with the LoRA and discarded afterwards (the saved adapter is a plain LoRA).
3. On the response tokens (as every other objective here; ``positions: all``: every non-padding token, as TinyBERT
   and DistillKit, their mean weighted as the response tokens):

       loss = (1 − α) · CE + α · mean over pairs of d(h_S^(i) W, h_T^(g(i)))

   with d the mean squared error over the hidden dimension (``mse``, TinyBERT) or 1 − cosine (``cosine``, the
   default: hidden-state norms grow with depth and differ between models by orders of magnitude, which lets
   MSE drown the CE term). Summed over response positions and divided by their number, like KD.

Hidden states are the outputs of the decoder layers (``output_hidden_states``; the last one after the final
norm, as transformers returns it, for both models). The teacher runs live at every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from pktransfer.config import MethodConfig
from pktransfer.methods.base import MethodContext, ObjectiveMethod
from pktransfer.methods.teacher_cache import live_teacher
from pktransfer.models.pair import check_pair
from pktransfer.ops.distill import hidden_distance, uniform_layer_pairs
from pktransfer.ops.offload import input_device
from pktransfer.training import BatchFn, LossFn, causal_lm_loss_sum, last_checkpoint, response_positions

PROJECTION_FILE = "hidden_kd_projection.safetensors"


def hidden_kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    projected: list[torch.Tensor],
    targets: list[torch.Tensor],
    *,
    alpha: float,
    distance: str,
    n_tokens: int | torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """(1 − α)·CE + α·mean_pairs d(h_S W, h_T), summed over the response positions and divided by ``n_tokens``
    (default: this batch's count). ``projected`` / ``targets``: per pair, [P, D_T] at the P distilled positions
    (row-major). ``keep``: the student's logits are at those positions only. ``weight`` scales the hidden term's
    sum (``positions: all``: response tokens / distilled tokens, so its mean counts as much as the response's)."""
    mask = response_positions(labels)
    n = mask.sum() if n_tokens is None else n_tokens
    ce = causal_lm_loss_sum(student_logits, labels, keep)
    if not projected:
        return ce / n
    hidden = (
        weight * torch.stack([hidden_distance(p, t, distance) for p, t in zip(projected, targets, strict=True)]).mean(0).sum()
    )
    return ((1 - alpha) * ce + alpha * hidden) / n


class HiddenKdConfig(MethodConfig):
    """Baseline: the student's paired layers trained toward the teacher's hidden states through a learned linear
    projection (MSE or cosine), plus (1 − alpha)·CE."""

    name: Literal["hidden_kd"] = "hidden_kd"
    pairing: Literal["uniform"] | list[tuple[int, int]] = Field(
        default="uniform", description="'uniform' (every student layer, spread over the teacher) or [[student, teacher], ...]"
    )
    distance: Literal["cosine", "mse"] = "cosine"
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the hidden-state term (1: no CE)")
    projection: Literal["shared", "per_layer"] = Field(
        default="shared", description="one projection for every pair (TinyBERT) or one per pair"
    )
    positions: Literal["response", "all"] = Field(
        default="response",
        description="the tokens whose hidden states are distilled: the response's (as every other objective here) or "
        "every non-padding token (TinyBERT, DistillKit), their mean weighted as the response tokens",
    )


class HiddenKdMethod(ObjectiveMethod):
    config_class = HiddenKdConfig
    needs_teacher = True
    teacher_use = "outputs"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.teacher: Any = None
        self.pairs: list[tuple[int, int]] = []
        self.projections: torch.nn.ModuleList | None = None
        self.model: Any = None
        self._hook: Any = None
        self._projected: list[torch.Tensor] | None = None

    @property
    def teacher_during_training(self) -> bool:
        return True

    def setup_objective(self, ctx: MethodContext, model: Any) -> None:
        from pktransfer.errors import RecipeError

        teacher = ctx.load_teacher()
        t_arch, s_arch = teacher.arch, ctx.student.arch
        # the teacher's logits are never read: output layers padded to other sizes (Qwen2.5 7B+ against 0.5-3B) are fine
        check_pair(t_arch, s_arch, teacher.tokenizer, ctx.student.tokenizer, self.name, padded_vocab=True)
        if self.spec.pairing == "uniform":
            self.pairs = uniform_layer_pairs(s_arch.n_layers, t_arch.n_layers)
        else:
            self.pairs = [(int(s), int(t)) for s, t in self.spec.pairing]
            bad = [(s, t) for s, t in self.pairs if not (0 <= s < s_arch.n_layers and 0 <= t < t_arch.n_layers)]
            if bad or not self.pairs:
                raise RecipeError(
                    f"method.pairing: {bad or 'no pairs'} outside the models' layers",
                    hint=f"student layers 0..{s_arch.n_layers - 1}, teacher layers 0..{t_arch.n_layers - 1}",
                )
        self.teacher = teacher
        n_proj = 1 if self.spec.projection == "shared" else len(self.pairs)
        device = input_device(model)
        self.projections = torch.nn.ModuleList(
            [torch.nn.Linear(s_arch.hidden_size, t_arch.hidden_size, bias=False) for _ in range(n_proj)]
        ).to(device=device, dtype=torch.float32)
        checkpoint = last_checkpoint(ctx.workdir / "checkpoints")
        if checkpoint and (Path(checkpoint) / PROJECTION_FILE).is_file():  # a resumed run: the trained projection
            from safetensors.torch import load_file

            self.projections.load_state_dict(load_file(str(Path(checkpoint) / PROJECTION_FILE)))
        # a submodule of the model, so the trainer's optimizer updates it with the LoRA (never saved in the adapter)
        model.add_module("pkt_hidden_projection", self.projections)
        # several processes: DistributedDataParallel cannot reduce the projection's gradient (one module applied to every
        # pair: "mark a variable ready only once"), so it leaves it out and SyncProjection averages it before each step
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, _ in model.named_parameters() if "pkt_hidden_projection" in n]
        )
        self.model = model
        # projected inside the model's forward (a hook on the student), not in the loss: under DistributedDataParallel
        # a parameter used outside the wrapped module's forward breaks its gradient reduction
        self._hook = model.register_forward_hook(self._project)

    def _project(self, module: Any, args: Any, outputs: Any) -> None:
        """Each pair's student hidden states through its projection, [B, L, D_T] (float32), when the forward returned
        hidden states (training batches ask for them)."""
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None or self.projections is None:
            self._projected = None
            return
        self._projected = [
            self.projections[0 if len(self.projections) == 1 else k](hidden[s + 1].float())  # [0]: the embeddings
            for k, (s, _) in enumerate(self.pairs)
        ]

    def training_batch(self, ctx: MethodContext) -> BatchFn:
        def with_hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {**batch, "output_hidden_states": True}

        # the same tokens as the trainer counted: the loss keeps its normaliser, so gradient accumulation is exact
        with_hidden_states.keeps_tokens = True  # type: ignore[attr-defined]
        return with_hidden_states

    def training_loss(self, ctx: MethodContext) -> LossFn:
        spec = self.spec

        def loss(outputs: Any, batch: dict[str, Any], n_tokens: Any) -> torch.Tensor:
            assert self.projections is not None
            labels = batch["labels"]
            mask = response_positions(labels)
            what = "live teacher hidden states at every training batch"
            # the teacher's logits are not read: its LM head runs at one position (it ran at all of them, 1.2 GB)
            t_hidden = live_teacher(ctx, self.teacher, batch, what, output_hidden_states=True, logits_to_keep=1).hidden_states
            projected, targets = [], []
            # response: the positions whose logits predict a response token; all: every non-padding token
            where = mask if spec.positions == "response" else batch["attention_mask"][:, :-1].bool().to(mask.device)
            assert self._projected is not None, "the student's forward returned no hidden states"
            for k, (_, t) in enumerate(self.pairs):
                h_s = self._projected[k][:, :-1][where]
                h_t = t_hidden[t + 1][:, :-1][where.to(t_hidden[t + 1].device)]
                projected.append(h_s)
                targets.append(h_t.float().to(h_s.device))
            self._projected = None
            return hidden_kd_loss(
                outputs.logits,
                labels,
                projected,
                targets,
                alpha=spec.alpha,
                distance=spec.distance,
                n_tokens=n_tokens,
                keep=batch.get("logits_positions"),
                weight=float(mask.sum()) / max(1, int(where.sum())),
            )

        loss.response_logits = True  # type: ignore[attr-defined]
        return loss

    def callbacks(self, ctx: MethodContext) -> list[Any]:
        from transformers import TrainerCallback

        method = self

        class SaveProjection(TrainerCallback):
            """The projection is not part of the adapter: keep it beside each checkpoint so a resumed run continues it."""

            def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                from pktransfer.fileio import save_safetensors

                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if method.projections is not None and folder.is_dir():
                    tensors = {k: v.detach().cpu().contiguous() for k, v in method.projections.state_dict().items()}
                    save_safetensors(tensors, folder / PROJECTION_FILE)

        class SyncProjection(TrainerCallback):
            """Several processes: the projection's gradient averaged over them before every optimizer step (what DDP
            does for every other parameter), so each process keeps the same projection."""

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                import torch.distributed as dist

                if method.projections is None or not dist.is_available() or not dist.is_initialized():
                    return
                world = dist.get_world_size()
                for p in method.projections.parameters():
                    if p.grad is not None and world > 1:
                        dist.all_reduce(p.grad)
                        p.grad /= world

        return [SaveProjection(), SyncProjection()]

    def finish_training(self) -> None:
        """The projection served training only: drop it so the adapter and the merged model are the student's."""
        self.teacher = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._projected = None
        if self.model is not None and "pkt_hidden_projection" in self.model._modules:
            del self.model._modules["pkt_hidden_projection"]

    def report(self) -> dict[str, Any]:
        return {
            "pairs": [{"student": s, "teacher": t} for s, t in self.pairs],
            "projection": self.spec.projection,
            "positions": self.spec.positions,
        }
