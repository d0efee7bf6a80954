"""GeometricDropout: the same distribution as torch's dropout, from ~p·n random numbers."""

from __future__ import annotations

import math

import pytest
import torch

from pktransfer.ops.dropout import GeometricDropout, dropped_positions


def test_dropped_positions_are_a_bernoulli_process():
    g = torch.Generator().manual_seed(0)
    n, p = 2_000_000, 0.05
    pos = dropped_positions(n, p, g)
    assert pos.dtype == torch.long and bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < n
    # the count is Binomial(n, p): within 5 standard deviations
    assert abs(len(pos) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    mask = torch.zeros(n)
    mask[pos] = 1
    # counts in blocks of 1000 have the binomial variance (a clumped or over-regular process would not)
    blocks = mask.view(-1, 1000).sum(1)
    assert blocks.var().item() == pytest.approx(1000 * p * (1 - p), rel=0.1)
    # neighbours are independent, and so is the first position (P(position 0 dropped) = p)
    assert abs(torch.corrcoef(torch.stack([mask[:-1], mask[1:]]))[0, 1].item()) < 0.005
    first = [int(dropped_positions(10, 0.3, torch.Generator().manual_seed(s))[:1].eq(0).sum()) for s in range(4000)]
    assert sum(first) / 4000 == pytest.approx(0.3, abs=0.03)


def test_edge_probabilities_and_short_draws():
    assert dropped_positions(100, 0.0).numel() == 0
    assert dropped_positions(7, 1.0).tolist() == list(range(7))
    assert dropped_positions(0, 0.5).numel() == 0
    g = torch.Generator().manual_seed(1)
    counts = [len(dropped_positions(3, 0.9, g)) for _ in range(3000)]  # many draws need a second round
    assert sum(counts) / 3000 == pytest.approx(2.7, abs=0.05)


def test_geometric_dropout_scales_kept_elements_is_identity_in_eval_and_passes_gradients():
    torch.manual_seed(0)
    d = GeometricDropout(0.25)
    x = torch.randn(64, 300, requires_grad=True)
    y = d(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    d.eval()
    assert torch.equal(d(x), x)
    assert isinstance(d, torch.nn.Dropout) and d.p == 0.25  # recipes and methods that read .p still see it
    assert GeometricDropout(0.1)(torch.ones(4, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_same_seed_same_mask():
    torch.manual_seed(3)
    a = GeometricDropout(0.05)(torch.ones(1000))
    torch.manual_seed(3)
    b = GeometricDropout(0.05)(torch.ones(1000))
    assert torch.equal(a, b)


# ---- the training fast path ------------------------------------------------------------------------------------


def test_response_ce_equals_the_models_own_loss_and_gradients(tiny_models):
    from transformers import AutoModelForCausalLM

    from pktransfer.training import response_ce

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2_student"])
    ids = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9], [8, 9, 10, 11, 12, 13, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    labels = torch.tensor([[-100] * 5 + [71, 2, 9], [-100] * 4 + [12, 13, -100, -100]])
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want.backward()
    g_want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total, n, out = response_ce(model, {"input_ids": ids, "attention_mask": mask}, labels)
    assert int(n) == 5 and out.logits.shape[1] == 4  # positions 3..6 predict a response token of some row
    (total / n).backward()
    assert (total / n).item() == pytest.approx(want.item(), rel=1e-5)
    for name, g in g_want.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, g, atol=1e-6), name


def test_a_bf16_student_trains_on_the_fast_path_and_on_the_plain_one(tiny_recipe, tmp_path):
    from conftest import bf16_training_runs

    runs = bf16_training_runs(tiny_recipe, tmp_path, "fast_path", [("fast", True), ("plain", False), ("fast-again", True)])
    final = {name: run["training"]["final_loss"] for name, run in runs.items()}
    assert final["fast"] == final["fast-again"]  # same seed, same result
    assert final["fast"] != final["plain"]  # the same recipe, other rounding and another dropout stream
    assert final["fast"] == pytest.approx(final["plain"], rel=0.05)


def test_the_attention_kernel_is_math_for_short_batches_and_flash_for_long_ones():
    from torch.nn.attention import SDPBackend

    from pktransfer.training import CPU_MATH_ATTENTION_MAX_LENGTH, cpu_attention_backends

    assert CPU_MATH_ATTENTION_MAX_LENGTH == 192
    assert cpu_attention_backends("auto", 50) == cpu_attention_backends("auto", 192) == [SDPBackend.MATH]
    assert cpu_attention_backends("auto", 193) == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]  # math: the fallback
    assert cpu_attention_backends("math", 4096) == [SDPBackend.MATH]
    assert cpu_attention_backends("flash", 8) == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with pytest.raises(ValueError, match="cpu_attention"):
        cpu_attention_backends("fast", 8)


@pytest.mark.parametrize(("setting", "length", "flash"), [("auto", 8, False), ("auto", 200, True), ("math", 200, False)])
def test_the_bf16_forward_runs_the_kernel_chosen(tiny_models, setting, length, flash):
    """What torch actually runs under the choice (torch.profiler), on a padded bf16 batch."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from pktransfer.training import cpu_bf16_training

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2_student"], torch_dtype=torch.bfloat16)
    ids = torch.randint(3, 50, (2, length))
    mask = torch.ones_like(ids)
    mask[1, length // 2 :] = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof, cpu_bf16_training(model, setting, length):
        model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert any("flash_attention" in n for n in names) is flash, sorted(n for n in names if "attention" in n)


def test_the_recipe_option_reaches_the_trainer_and_old_records_read_as_math(tiny_recipe, tmp_path, monkeypatch):
    from conftest import bf16_training_runs

    import pktransfer.training as training
    from pktransfer.runs import as_current_schema

    seen = []
    real = training.cpu_attention_backends
    monkeypatch.setattr(training, "cpu_attention_backends", lambda s, n: seen.append((s, n)) or real(s, n))
    runs = bf16_training_runs(tiny_recipe, tmp_path, "cpu_attention", [("flash", "flash"), ("auto", "auto")])
    assert runs["flash"]["recipe"]["training"]["cpu_attention"] == "flash"
    assert {s for s, _ in seen} == {"flash", "auto"} and all(n > 0 for _, n in seen)
    upgraded = as_current_schema({"training": {"fast_path": True, "lr": 1e-4}})
    assert upgraded is not None and upgraded["training"]["cpu_attention"] == "math"


# every method of the MMLU study, as the study runs it: a bfloat16 student on the CPU fast path (autocast, fused step).
# SemAlign once failed here at its first step: autocast refused to concatenate its float16 targets.
STUDY_METHODS = [
    {"name": "lora"},
    {"name": "pissa"},
    {"name": "kd", "temperature": 2.0, "alpha": 0.5},
    {"name": "weight_selection"},
    {"name": "seeking", "n_seed": 3},
    {"name": "seeking", "n_seed": 3, "structure": "random"},
    {"name": "semalign", "n_seed": 3, "critical_layers": 2, "decomposition": "dual", "output_loss": "kl"},
    {"name": "gkd"},
    {"name": "hidden_kd"},
    {"name": "compose", "start": {"name": "seeking", "n_seed": 3}, "objective": {"name": "gkd"}},
    {"name": "laten", "checkpoint": 1, "init_std": 0.02, "lr": 1e-3, "transfer_rate": 0.2},
]


# the second variant also forces the flash attention kernel (tiny batches take math under auto): every method's
# forward, hooks and sampling run under both kernels
@pytest.mark.parametrize("fused", [True, False], ids=["fused-math", "peft-flash"])
@pytest.mark.parametrize(
    "method",
    STUDY_METHODS,
    ids=["lora", "pissa", "kd", "ws", "seeking", "seeking-random", "semalign", "gkd", "hkd", "s+gkd", "laten"],
)
def test_every_study_method_trains_a_bf16_student_on_the_fast_path(tiny_recipe, tmp_path, method, fused):
    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    tiny_recipe["student"]["dtype"] = "bfloat16"
    tiny_recipe["teacher"]["dtype"] = "bfloat16"
    tiny_recipe["method"] = method
    tiny_recipe["lora"]["dropout"] = 0.05
    tiny_recipe["training"].update(max_steps=2, fast_path=True, fused_step=fused, cpu_attention="auto" if fused else "flash")
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True, evaluate=False)
    if method["name"] == "laten":  # its hypernetwork trains in its own loop (one update per extract item)
        norms = res.run["method"]["delta_norm"].values()
        assert res.run["training"]["steps"] == 2 and all(math.isfinite(v) and v > 0 for v in norms)
        return
    assert res.run["training"]["steps"] == 2 and math.isfinite(res.run["training"]["final_loss"])
