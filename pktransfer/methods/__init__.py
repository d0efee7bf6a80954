"""Transfer methods and baselines, one file each; adding a method = its file + one ``register`` line here."""

from __future__ import annotations

from pktransfer.methods import registry
from pktransfer.methods.base import Method, MethodContext
from pktransfer.methods.compose import ComposeMethod
from pktransfer.methods.delta import DeltaMethod
from pktransfer.methods.gkd import GkdMethod
from pktransfer.methods.hidden_kd import HiddenKdMethod
from pktransfer.methods.kd import KdMethod
from pktransfer.methods.laten import LatenMethod
from pktransfer.methods.lora import LoraMethod, PissaMethod
from pktransfer.methods.seeking import SeekingMethod
from pktransfer.methods.semalign import SemAlignMethod
from pktransfer.methods.weight_selection import WeightSelectionMethod

registry.register(LoraMethod)
registry.register(PissaMethod)
registry.register(KdMethod)
registry.register(WeightSelectionMethod)
registry.register(SeekingMethod)
registry.register(SemAlignMethod)
registry.register(LatenMethod)
registry.register(GkdMethod)
registry.register(HiddenKdMethod)
registry.register(DeltaMethod)
registry.register(ComposeMethod)


def get_method(config: object) -> Method:
    """The method behind a recipe's ``method`` config."""
    return registry.create(config)  # type: ignore[arg-type]


__all__ = ["Method", "MethodContext", "get_method", "registry"]
