"""The fused LoRA linear (training.fused_step): peft's function, mask and gradients, in one autograd function."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pktransfer.ops.fused_lora import FusedLoraLinear, fuse_lora_layers
from pktransfer.training import fast_path


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(12, 20)  # with a bias
        self.o = torch.nn.Linear(20, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)))


def pair(dtype: torch.dtype, dropout: float, alpha: int = 8) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same peft model twice (B initialised non-zero, the fast path's dropout): peft's forward, and fused."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q", "o"], init_lora_weights=False)
    plain = get_peft_model(Block().to(dtype), cfg)
    for p in plain.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32 if dtype == torch.bfloat16 else dtype)  # LoRA weights stay fp32 in bf16
    fast_path(plain)
    fused = copy.deepcopy(plain)
    assert fuse_lora_layers(fused) == 2
    plain.train()
    fused.train()
    return plain, fused


def run(model: torch.nn.Module, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from peft.helpers import disable_input_dtype_casting

    torch.manual_seed(seed)  # the dropout masks: the same random stream for both
    x = x.detach().clone().requires_grad_()
    if x.dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(model):
            y = model(x)
    else:
        y = model(x)
    (y.float() ** 2).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("alpha", [4, 8])
def test_same_function_mask_and_gradients_as_peft_in_float64(dropout, alpha):
    plain, fused = pair(torch.float64, dropout, alpha)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    y1, gx1, g1 = run(plain, x)
    y2, gx2, g2 = run(fused, x)
    assert torch.allclose(y1, y2, atol=1e-12, rtol=0)
    assert torch.allclose(gx1, gx2, atol=1e-12, rtol=0)
    assert g1.keys() == g2.keys() and len(g1) == 4
    for name in g1:
        assert g2[name].dtype == torch.float64
        assert torch.allclose(g1[name], g2[name], atol=1e-12, rtol=0), name
    # the check has teeth: another mask (another seed) gives other gradients
    _, _, g3 = run(fused, x, seed=2)
    assert dropout == 0 or not torch.allclose(
        g1["base_model.model.q.lora_A.default.weight"], g3["base_model.model.q.lora_A.default.weight"]
    )


def test_dropped_inputs_get_only_the_base_weights_gradient():
    """A dropped input element passes no gradient through the LoRA path (the restored entries of the backward)."""
    torch.manual_seed(0)
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 10, dtype=torch.float64)
    a = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = FusedLoraLinear.apply(x, w, None, a, b, 0.5, 0.4)
    g = torch.randn_like(y)
    y.backward(g)
    # recover the mask from the forward: y - x·Wᵀ = 0.5 · (x ⊙ m / 0.6) · Aᵀ · Bᵀ, so redo it with the same draw
    from pktransfer.ops.dropout import dropped_positions

    torch.manual_seed(5)
    keep = torch.ones(60, dtype=torch.float64)
    keep[dropped_positions(60, 0.4)] = 0
    keep = keep.view(6, 10)
    assert 0 < keep.sum() < 60
    want_y = x @ w.t() + 0.5 * ((x * keep / 0.6) @ a.t()) @ b.t()
    assert torch.allclose(y, want_y, atol=1e-12)
    want_gx = g @ w + 0.5 * (g @ b @ a) * keep / 0.6
    assert torch.allclose(x.grad, want_gx, atol=1e-12)
    assert torch.allclose(x.grad[keep == 0], (g @ w)[keep == 0], atol=1e-12)


def test_bfloat16_activations_fp32_lora_weights_differ_only_by_rounding():
    plain, fused = pair(torch.bfloat16, 0.3)
    x = torch.randn(4, 9, 12).to(torch.bfloat16)
    y1, gx1, g1 = run(plain, x)
    y2, gx2, g2 = run(fused, x)
    assert (gx1.float() - gx2.float()).abs().max() <= 0.03 * gx1.float().abs().max()
    assert y2.dtype == torch.bfloat16 and gx2.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in g2.values())  # the LoRA weights' own dtype
    scale = y1.abs().max()
    assert (y1.float() - y2.float()).abs().max() <= 0.02 * scale
    for name in g1:
        assert (g1[name] - g2[name]).abs().max() <= 0.03 * g1[name].abs().max(), name


def test_peft_forward_outside_training_and_for_layers_it_cannot_fuse():
    plain, fused = pair(torch.float64, 0.3)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    for m in (plain, fused):
        m.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), fused(x))  # eval: peft's forward (dropout is the identity)
    fused.train()
    with torch.no_grad():  # training mode without gradients: peft's forward, so the same masks draw the same way
        torch.manual_seed(3)
        want = plain.train()(x)
        torch.manual_seed(3)
        assert torch.equal(fused(x), want)
    with fused.disable_adapter():  # the adapter off while training: the base model's own function
        q, o = fused.base_model.model.q.base_layer, fused.base_model.model.o.base_layer
        assert torch.equal(fused(x), o(torch.tanh(q(x))))
    # a trainable base weight or a DoRA layer is left to peft
    torch.manual_seed(0)
    dora = get_peft_model(Block().double(), LoraConfig(r=4, target_modules=["q", "o"], use_dora=True))
    assert fuse_lora_layers(dora) == 0
    other = get_peft_model(Block().double(), LoraConfig(r=4, target_modules=["q", "o"]))
    other.base_model.model.q.base_layer.weight.requires_grad_(True)
    assert fuse_lora_layers(other) == 1


def test_a_recipe_trains_fused_by_default_and_unfused_when_asked(tiny_recipe, tmp_path):
    from conftest import bf16_training_runs

    runs = bf16_training_runs(tiny_recipe, tmp_path, "fused_step", [("fused", True), ("peft", False), ("fused-again", True)])
    final = {name: run["training"]["final_loss"] for name, run in runs.items()}
    trained = {name: run["recipe"]["training"]["fused_step"] for name, run in runs.items()}
    assert trained == {"fused": True, "peft": False, "fused-again": True}
    assert final["fused"] == final["fused-again"]  # same seed, same result
    assert final["fused"] == pytest.approx(final["peft"], rel=0.02)  # same mask stream; only rounding differs


def test_records_made_before_the_option_read_as_unfused():
    from pktransfer.runs import as_current_schema

    upgraded = as_current_schema({"training": {"fast_path": True, "lr": 1e-4}})
    assert upgraded is not None and upgraded["training"]["fused_step"] is False
