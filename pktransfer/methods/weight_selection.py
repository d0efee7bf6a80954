"""Baseline: weight selection (Xu et al., ICLR 2024) as a LoRA initialisation (methods.md §4).

1. Layers: student layer m takes teacher layer l_m, the first N (Xu et al.'s choice), evenly spaced, the
   last N, or an explicit list.
2. Dimensions: one evenly spaced index set per space (residual stream, attention heads, key/value heads,
   MLP); a weight [out, in] keeps rows from its output space's set and columns from its input space's,
   so every tensor sharing a dimension uses the same teacher indices. Embeddings and lm_head keep the
   whole (shared) vocabulary and select along the hidden axis.
3. Injection exactly as Seeking's steps 4-5: LoRA starts at the top-r SVD of the selected matrix and
   the base keeps W_S − s·B A, so step-0 outputs equal the student's, and the saved adapter is rebased
   onto the unmodified student.

It is Seeking without the sensitivity: comparing the two isolates what locating knowledge adds. Xu et
al. copy the selected weights outright into an untrained student; for a pretrained student that would
discard its own weights, so the transfer here goes through the same LoRA budget as every other method.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from pktransfer.config import MethodConfig
from pktransfer.errors import IncompatiblePairError, RecipeError
from pktransfer.fileio import write_json
from pktransfer.methods.base import Method, MethodContext
from pktransfer.methods.injection import group_roles, lora_started_at, stack_roles, targeted_roles, teacher_for_injection
from pktransfer.models.arch import ATTENTION_ROLES, FFN_ROLES, ArchitectureDescription
from pktransfer.ops.offload import stored_value
from pktransfer.ops.selection import select_layers, space_indices
from pktransfer.training import resolved_lora

SPACES = ("residual", "heads", "kv_heads", "mlp")


def selection_plan(
    t_arch: ArchitectureDescription, s_arch: ArchitectureDescription, layers: Any
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Teacher layers for the student's layers, and the index set of every space."""
    try:
        chosen = select_layers([0.0] * t_arch.n_layers, s_arch.n_layers, layers)
        idx = space_indices({s: t_arch.space_size(s) for s in SPACES}, {s: s_arch.space_size(s) for s in SPACES})
    except ValueError as err:
        raise IncompatiblePairError(
            f"weight_selection: {err}", hint="the student must be no larger than the teacher in every dimension"
        ) from None
    return chosen, idx


def selected_matrices(
    teacher: Any, s_arch: ArchitectureDescription, layers: list[int], idx: dict[str, torch.Tensor], roles: set[str]
) -> dict[str, torch.Tensor]:
    """Student module name -> the student-shaped teacher matrix (float32); a fused module's roles are each
    selected from the teacher's block of the same role and stacked."""
    t_arch: ArchitectureDescription = teacher.arch
    get = teacher.model.get_submodule  # through the module: a tied lm_head is not in named_parameters()
    out: dict[str, torch.Tensor] = {}
    for role, t_mod, s_mod in (
        ("embed", t_arch.embed_module, s_arch.embed_module),
        ("lm_head", t_arch.lm_head_module, s_arch.lm_head_module),
    ):
        if role in roles:
            w_t = stored_value(get(t_mod)).detach()
            out[s_mod] = w_t[:, idx["residual"].to(w_t.device)].float().cpu()
    parts: list[tuple[str, torch.Tensor]] = []
    for m, t_layer in enumerate(layers):
        spaces = {w.role: w for w in t_arch.layer_weights(t_layer)}
        for role in (*ATTENTION_ROLES, *FFN_ROLES):
            if role in roles:
                w = spaces[role]
                mat = t_arch.role_weight(teacher.model, t_layer, role)
                rows, cols = idx[w.out_space].to(mat.device), idx[w.in_space].to(mat.device)
                parts.append((s_arch.module_name(m, role), mat[rows][:, cols].float().cpu()))
    return out | stack_roles(parts)


class WeightSelectionConfig(MethodConfig):
    """Baseline (Xu et al., ICLR 2024): LoRA started from uniformly spaced teacher indices, no sensitivity."""

    name: Literal["weight_selection"] = "weight_selection"
    layers: Literal["first", "uniform", "last"] | list[int] = Field(
        default="first", description="teacher layers for the student's layers (Xu et al.: the first N)"
    )
    modules: list[Literal["embed", "attention", "ffn", "all"]] = Field(default_factory=lambda: ["all"], min_length=1)


class WeightSelectionMethod(Method):
    config_class = WeightSelectionConfig
    needs_teacher = True
    teacher_use = "weights"
    is_start = True

    def prepare(self, ctx: MethodContext) -> Any:
        spec, recipe = self.spec, ctx.recipe
        teacher = teacher_for_injection(ctx, self.name)
        try:
            layers, idx = selection_plan(teacher.arch, ctx.student.arch, spec.layers)
        except IncompatiblePairError as err:
            if not isinstance(spec.layers, str):
                raise RecipeError(
                    f"method.layers: {err.message}", hint=f"the teacher has {teacher.arch.n_layers} layers"
                ) from None
            raise
        roles = targeted_roles(resolved_lora(recipe.lora, ctx.student.arch).target_modules) & group_roles(spec.modules)
        matrices = selected_matrices(teacher, ctx.student.arch, layers, idx, {r for r in roles if r})
        write_json(
            ctx.workdir / "weight_selection.json",
            {
                "selected_layers": layers,
                "mapping": {f"student.{m}": f"teacher.{t}" for m, t in enumerate(layers)},
                "index_sets": {
                    s: {"teacher": teacher.arch.space_size(s), "student": len(v), "first": v[:8].tolist()} for s, v in idx.items()
                },
                "roles_injected": sorted(r for r in roles if r),
            },
        )
        ctx.progress.log(f"weight_selection: teacher layers {layers} -> student layers 0..{len(layers) - 1}")
        model, self.initial_lora = lora_started_at(ctx, matrices)
        return model
