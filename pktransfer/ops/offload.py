"""Where a model's tensors live when accelerate shards it (``device_map``, ``max_memory``, CPU or disk offload).

A sharded model's modules sit on different devices; an offloaded module's parameters are on ``meta`` between
forwards, and accelerate's hook (``module._hf_hook``) puts a fresh copy on the execution device for each
forward. Code that reads a teacher's weights or feeds it inputs goes through these helpers instead of
``module.weight`` or ``next(model.parameters()).device``, which are wrong (``meta``) for an offloaded module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def offload_hook(module: torch.nn.Module) -> Any | None:
    """accelerate's hook on ``module`` when its own weights are offloaded (held in the hook's weights map), else None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one hook
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def stored_value(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The value of ``module``'s parameter ``name`` wherever it lives: the parameter itself, or for an offloaded
    module the copy in accelerate's weights map (CPU memory or a memory-mapped disk file)."""
    p = getattr(module, name)
    if p.device.type != "meta":
        return p
    hook = offload_hook(module)
    if hook is None:
        raise RuntimeError(f"parameter '{name}' of {type(module).__name__} is on the meta device and no offload hook holds it")
    return hook.weights_map[name]


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its weights' device, or an offloaded module's execution device."""
    hook = offload_hook(module)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        dev = hook.execution_device
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model: Any) -> torch.device:
    """Where a model's input ids go: the device its input embeddings compute on (the only device for an unsharded model)."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:  # not a transformers model: its first parameter's device
        return next(model.parameters()).device
    return execution_device(get())


@contextmanager
def parked(model: Any) -> Iterator[None]:
    """``model`` (whole on one GPU) waits in CPU memory while the block runs, and returns to its GPU after it.

    Seeking's sensitivity pass needs the teacher, its maps and activations on the GPU, and only the student's shape:
    for Llama-2 13B -> 7B the 7B student's 12.6 GiB on the same GPU made the pass 79.5 GiB by ``pkt plan``, over an
    80 GB GPU's 74.5 GiB; parked, 67 GiB. Exact (the same tensors, moved); costs two copies over PCIe (seconds). A
    model on the CPU, or sharded (``hf_device_map``), stays where it is."""
    device = input_device(model)
    move = device.type == "cuda" and getattr(model, "hf_device_map", None) is None
    if move:
        model.to("cpu")
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        if move:
            model.to(device)
