"""Baselines: LoRA on the student with the init named in ``lora.init`` (default, gaussian, or PiSSA), and
``pissa`` as a method of its own.

PiSSA (peft's ``init_lora_weights="pissa"``) starts the adapter at the student's own top-r singular
vectors and moves them out of the base weight. The saved adapter is rebased (``save_rebased_adapter``,
the same mechanism Seeking uses) so it applies to the unmodified student like any LoRA.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pktransfer.config import MethodConfig
from pktransfer.methods.base import Method, MethodContext, plain_lora, snapshot_lora
from pktransfer.training import check_targets, lora_config


class LoraConfig(MethodConfig):
    """Plain LoRA on the student (the reference baseline); LoRA init comes from ``lora.init``."""

    name: Literal["lora"] = "lora"


class LoraMethod(Method):
    config_class = LoraConfig
    is_start = True  # the plain start: composing it with an objective is that objective alone

    def prepare(self, ctx: MethodContext) -> Any:
        model, self.initial_lora = plain_lora(ctx)
        return model


class PissaConfig(MethodConfig):
    """Baseline: LoRA started at the student's own top-r singular vectors (peft's PiSSA init); ``lora.init`` is ignored."""

    name: Literal["pissa"] = "pissa"
    niter: int | None = Field(
        default=None, ge=1, description="fast randomised SVD with this many subspace iterations (None: exact SVD)"
    )


class PissaMethod(Method):
    config_class = PissaConfig
    is_start = True
    """PiSSA: the adapter starts at the student's top-r singular triplets, B = U_r√Σ_r, A = √Σ_r V_rᵀ
    (divided by the LoRA scaling), and the base keeps the residual W − s·B A (peft's implementation)."""

    def prepare(self, ctx: MethodContext) -> Any:
        from peft import get_peft_model

        spec = ctx.recipe.lora
        check_targets(ctx.student.model, spec, ctx.student.arch, ctx.progress.warn)
        init = "pissa" if self.spec.niter is None else f"pissa_niter_{self.spec.niter}"
        model = get_peft_model(ctx.student.model, lora_config(spec, ctx.student.arch, init=init))
        self.initial_lora = snapshot_lora(model)
        return model
