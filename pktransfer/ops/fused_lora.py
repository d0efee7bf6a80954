"""A LoRA linear's training step as one autograd function: the fast path's LoRA on CPU.

peft computes ``y = W·x + s·B·A·dropout(x)`` (W frozen) as separate operators, each a pass over an activation:
the dropout's scaled copy of x, the scaling multiply and the addition of the LoRA output in the forward, and their
mirror images in the backward (a clone and fill for the mask, the scaling multiply, the gradient accumulation into
x's gradient). On CPU those passes, not the matrix products, were most of a LoRA step's time (bench/train_step.py).
Here the same function is computed with the scalars folded into the small matrices and the additions fused into the
matrix products (``addmm_``):

    forward:   x_m = x with the dropped positions zeroed          (the mask's only pass over x)
               h   = x_m · (k·A)ᵀ                     [N, r]       (k = 1 / (1 − p): dropout's scaling, on A)
               y   = W·x (+ bias);  y += s · h · Bᵀ                (one addmm_)
    backward:  g_h = s · g · B                        [N, r]
               ∂B  = s · gᵀ · h,    ∂A = k · g_hᵀ · x_m
               ∂x  = g · W;  ∂x += g_h · (k·A)  except at the dropped positions, which keep g · W (one addmm_,
                     then the few dropped entries restored)

Same function, same mask (drawn by :func:`~pktransfer.ops.dropout.dropped_positions` from the same random stream as
:class:`~pktransfer.ops.dropout.GeometricDropout`, module by module in the same order), same dtypes (A and B cast to
the activations' dtype for the products, their gradients returned in their own); only the rounding order differs.
Used for plain LoRA layers of peft (``lora.Linear`` over an ``nn.Linear`` held in memory, one active adapter, no
DoRA, no LoRA bias, frozen base weight) while training on CPU (``training.fused_step``); everything else, and every
forward without gradients, runs peft's own.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from pktransfer.ops.dropout import dropped_positions


class FusedLoraLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias) + scaling · (dropout_p(x) · Aᵀ) · Bᵀ`` with the frozen ``weight``/``bias``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        p: float,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        keep_scale = 1.0 / (1.0 - p)
        dropped = dropped_positions(x2.numel(), p).to(x.device) if p > 0 else None
        if dropped is not None:
            x_m = x2.clone()
            x_m.view(-1).index_fill_(0, dropped, 0)
        else:
            x_m = x2
        a_k = (lora_a * keep_scale).to(x.dtype) if p > 0 else lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        h = x_m @ a_k.t()
        y = torch.nn.functional.linear(x2, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x_m, h, weight, a_k, b, dropped)
        ctx.scaling, ctx.keep_scale, ctx.shape = scaling, keep_scale, shape
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x_m, h, weight, a_k, b, dropped = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        g_h = g @ b
        g_h.mul_(ctx.scaling)
        grad_b = (g.t() @ h).to(ctx.b_dtype).mul_(ctx.scaling)
        grad_a = (g_h.t() @ x_m).to(ctx.a_dtype).mul_(ctx.keep_scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(g.dtype)
            kept = grad_x.view(-1).index_select(0, dropped) if dropped is not None else None
            grad_x.addmm_(g_h, a_k)
            if dropped is not None:
                grad_x.view(-1).index_copy_(0, dropped, kept)
            grad_x = grad_x.view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def _fusable(layer: Any) -> str | None:
    """The adapter name when ``layer`` (a peft LoRA Linear) is a plain one the fused function computes exactly."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1 or layer.merged or layer.disable_adapters:
        return None
    name = adapters[0]
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or base.weight.requires_grad or getattr(layer, "fan_in_fan_out", False):
        return None
    if hasattr(base, "_hf_hook") or base.weight.device.type == "meta":  # an offloaded weight is loaded by its hook
        return None
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return None
    a, bmod = layer.lora_A[name], layer.lora_B[name]
    if type(a) is not torch.nn.Linear or type(bmod) is not torch.nn.Linear or a.bias is not None or bmod.bias is not None:
        return None
    drop = layer.lora_dropout[name]
    if not isinstance(drop, (torch.nn.Dropout, torch.nn.Identity)):
        return None
    return name


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    plain = not (self.training and torch.is_grad_enabled()) or bool(args or kwargs) or x.device.type != "cpu"
    name = None if plain else _fusable(self)  # the layer's state (merged, adapters off) can change between calls
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
    return FusedLoraLinear.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]), p
    )


def fuse_lora_layers(model: Any) -> int:
    """Route the training forward of every plain peft LoRA Linear in ``model`` through :class:`FusedLoraLinear`
    (other modes, layers and devices keep peft's forward). Returns how many layers were routed."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in model.modules():
        if isinstance(module, Linear) and _fusable(module) is not None:
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
