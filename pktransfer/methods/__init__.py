"""Transfer methods and baselines, one file each, registered by the recipe's ``method.name``."""

from __future__ import annotations

from typing import Any

from pktransfer.methods.base import Method, MethodContext
from pktransfer.methods.kd import KdMethod
from pktransfer.methods.laten import LatenMethod
from pktransfer.methods.lora import LoraMethod, PissaMethod
from pktransfer.methods.seeking import SeekingMethod
from pktransfer.methods.semalign import SemAlignMethod
from pktransfer.methods.weight_selection import WeightSelectionMethod

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (LoraMethod, PissaMethod, KdMethod, WeightSelectionMethod, SeekingMethod, SemAlignMethod,
                 LatenMethod)
}


def get_method(spec: Any) -> Method:
    return METHODS[spec.name](spec)


__all__ = ["METHODS", "Method", "MethodContext", "get_method"]
