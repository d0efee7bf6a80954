"""Baseline: LoRA on the student with the init named in ``lora.init`` (default, gaussian, or PiSSA).

PiSSA (peft's ``init_lora_weights="pissa"``) starts the adapter at the student's own top-r singular
vectors and moves them out of the base weight. The saved adapter is converted with peft's
``path_initial_model_for_weight_conversion`` so it applies to the unmodified student like any LoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pktransfer.methods.base import Method, MethodContext
from pktransfer.training import check_targets, lora_config


class LoraMethod(Method):
    name = "lora"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._initial_adapter: Path | None = None

    def prepare(self, ctx: MethodContext) -> Any:
        from peft import get_peft_model

        spec = ctx.recipe.lora
        check_targets(ctx.student.model, spec)
        model = get_peft_model(ctx.student.model, lora_config(spec))
        if spec.init == "pissa":
            self._initial_adapter = ctx.workdir / "pissa_init"
            cfg = model.peft_config["default"]
            cfg.init_lora_weights = True  # reload the saved initial adapter as-is
            model.save_pretrained(str(self._initial_adapter))
            cfg.init_lora_weights = "pissa"
        return model

    def save_adapter(self, model: Any, folder: Path) -> None:
        if self._initial_adapter is not None:
            model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(self._initial_adapter))
        else:
            model.save_pretrained(str(folder))
