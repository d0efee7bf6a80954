"""Transfer methods and baselines, one file each, registered by the recipe's ``method.name``."""

from __future__ import annotations

from typing import Any

from pktransfer.methods.base import Method, MethodContext
from pktransfer.methods.lora import LoraMethod
from pktransfer.methods.seeking import SeekingMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoraMethod, SeekingMethod)}


def get_method(spec: Any) -> Method:
    return METHODS[spec.name](spec)


__all__ = ["METHODS", "Method", "MethodContext", "get_method"]
