"""Steps 4-5 of Seeking, shared with weight selection: start a LoRA at a teacher-derived matrix.

For each targeted student weight W_S and its matrix W_x (a reduced teacher weight), the LoRA starts at
(B, A) = SVD_r(W_x) and the base becomes W_S − (α/r)·B A, so the student's outputs at step 0 are
unchanged. A tied lm_head is untied first (the subtraction must not move the shared matrix twice).
"""

from __future__ import annotations

from typing import Any

import torch

from pktransfer.errors import RecipeError
from pktransfer.methods.base import MethodContext, snapshot_lora
from pktransfer.models.arch import ATTENTION_ROLES, FFN_ROLES, ROLES_OF_LEAF, ArchitectureDescription
from pktransfer.models.pair import check_pair
from pktransfer.models.tying import untie_if_targeted
from pktransfer.ops.lowrank import svd_init
from pktransfer.training import check_targets, lora_config

GROUPS = {"embed": ("embed", "lm_head"), "attention": ATTENTION_ROLES, "ffn": FFN_ROLES}


def group_roles(modules: list[str]) -> set[str]:
    names = list(GROUPS) if "all" in modules else modules
    return {r for g in names for r in GROUPS[g]}


def targeted_roles(target_modules: list[str]) -> set[str]:
    """The weight roles a LoRA on ``target_modules`` covers (a fused module's name covers all of its roles)."""
    return {r for t in target_modules for r in ROLES_OF_LEAF.get(t, ())}


def stack_roles(parts: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Module name -> its matrix, from (module, role matrix) pairs in role order: the roles of a fused module
    (Phi-3's q/k/v, gate/up) are stacked along the rows in that order, each block cut from its own role."""
    grouped: dict[str, list[torch.Tensor]] = {}
    for module, mat in parts:
        grouped.setdefault(module, []).append(mat)
    return {m: mats[0] if len(mats) == 1 else torch.cat(mats, dim=0) for m, mats in grouped.items()}


@torch.no_grad()
def inject(peft_model: Any, matrices: dict[str, torch.Tensor], adapter: str = "default", on_module: Any = None) -> dict[str, int]:
    """Start each LoRA at (B, A) = SVD_r(W_x) and subtract s·B A from its base weight. Returns ranks used."""
    modules = dict(peft_model.base_model.model.named_modules())
    used = {}
    for name, w_x in matrices.items():
        layer = modules[name]
        s = layer.scaling[adapter]
        if hasattr(layer, "lora_embedding_A") and adapter in layer.lora_embedding_A:
            a_param, b_param = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
            r = a_param.shape[0]
            b, a = svd_init(w_x.T, r)  # peft's embedding delta is (B A)ᵀ with B [hidden, r], A [r, vocab]
            base = layer.get_base_layer().weight
            b, a = b.to(base.device), a.to(base.device)  # the SVD runs on the CPU copy in float32
            a_param.copy_(a)
            b_param.copy_(b)
            base.sub_((s * (b @ a)).T.to(base.dtype))
        else:
            r = layer.lora_A[adapter].weight.shape[0]
            b, a = svd_init(w_x, r)
            base = layer.get_base_layer().weight
            b, a = b.to(base.device), a.to(base.device)
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)
            base.sub_((s * (b @ a)).to(base.dtype))
        used[name] = r
        if on_module:
            on_module()
    return used


def check_ranks(arch: ArchitectureDescription, recipe: Any) -> None:
    """Every targeted LoRA rank fits the smaller dimension of its student weight (a fused module's whole)."""
    from pktransfer.training import resolved_lora

    spec = resolved_lora(recipe.lora, arch)
    shapes = {
        w.module: (arch.module_rows(w.role) if w.rows else w.shape[0], w.shape[1]) for w in arch.weights() if len(w.shape) == 2
    }
    for module, shape in shapes.items():
        leaf = module.rsplit(".", 1)[-1]
        if leaf in spec.target_modules:
            r = spec.rank_pattern.get(leaf, spec.r)
            if r > min(shape):
                raise RecipeError(
                    f"lora rank {r} exceeds the smaller dimension of {module} {shape}",
                    hint=f"use lora.r <= {min(shape)} (or a rank_pattern entry for {leaf})",
                )


def teacher_for_injection(ctx: MethodContext, method: str) -> Any:
    """The teacher, once targets, the pair and the ranks are known to fit (methods that inject its weights)."""
    check_targets(ctx.student.model, ctx.recipe.lora, ctx.student.arch, ctx.progress.warn)
    teacher = ctx.load_teacher()
    check_pair(teacher.arch, ctx.student.arch, teacher.tokenizer, ctx.student.tokenizer, method)
    check_ranks(ctx.student.arch, ctx.recipe)
    return teacher


def lora_started_at(ctx: MethodContext, matrices: dict[str, torch.Tensor]) -> tuple[Any, dict[str, Any]]:
    """Steps 4-5: the student's LoRA at SVD_r of each matrix, the base holding the residual; returns the
    PEFT model and its starting factors (what ``Method.save_adapter`` rebases against)."""
    from peft import get_peft_model

    untie_if_targeted(ctx.student, ctx.recipe.lora.target_modules, ctx.progress.log)  # W − s·BA must not move lm_head
    model = get_peft_model(ctx.student.model, lora_config(ctx.recipe.lora, ctx.student.arch, init=True))
    with ctx.progress.task("SVD init per module", total=len(matrices)) as advance:
        inject(model, matrices, on_module=lambda: advance(1))
    return model, snapshot_lora(model)
