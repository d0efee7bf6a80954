"""Baselines: kd (loss by hand, cache), pissa and weight_selection (initialisation structure)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import pktransfer
from pktransfer.methods.kd import kd_loss
from pktransfer.ops.distill import kl_to_teacher
from pktransfer.ops.selection import select_layers, space_indices, uniform_indices
from pktransfer.recipe import recipe_from_dict

IDS = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])


def _recipe(base: dict, **method):
    return recipe_from_dict({**base, "method": method})


# ---- KD loss ---------------------------------------------------------------------------------------


def test_kl_against_a_hand_computation():
    s = torch.tensor([[0.0, 0.0, 0.0]])  # q = (1/3, 1/3, 1/3)
    t = torch.tensor([[math.log(2.0), 0.0, 0.0]])  # p = (1/2, 1/4, 1/4)
    expected = 0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3)
    assert kl_to_teacher(s, t, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # temperature 2: p ∝ (√2, 1, 1)
    z = math.sqrt(2) + 2
    p = [math.sqrt(2) / z, 1 / z, 1 / z]
    assert kl_to_teacher(s, t, 2.0).item() == pytest.approx(sum(pi * math.log(pi * 3) for pi in p), abs=1e-6)
    # the same distribution: 0
    assert kl_to_teacher(t, t, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_top_k_kl_equals_full_kl_when_k_is_the_vocabulary_and_is_never_negative():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    full = kl_to_teacher(s, t, 1.5)
    vals, ids = t.topk(11, dim=-1)
    assert torch.allclose(kl_to_teacher(s, vals, 1.5, ids), full, atol=1e-6)
    vals, ids = t.topk(3, dim=-1)
    assert (kl_to_teacher(s, vals, 1.5, ids) >= -1e-7).all()


def test_kd_loss_mixes_ce_and_kl_over_response_tokens_only():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 5, generator=g)
    labels = torch.tensor([[-100, -100, 3, 1]])  # positions 1 and 2 predict response tokens
    teacher = torch.randn(2, 5, generator=g)
    ce = (torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:], reduction="sum")).item()
    kl = kl_to_teacher(logits[0, 1:3], teacher, 2.0).sum().item()
    got = kd_loss(logits, labels, teacher, None, temperature=2.0, alpha=0.25).item()
    assert got == pytest.approx((0.75 * ce + 0.25 * 4 * kl) / 2, rel=1e-6)
    assert kd_loss(logits, labels, teacher, None, temperature=2.0, alpha=0.0).item() == pytest.approx(ce / 2, rel=1e-6)
    # an explicit normaliser (the accumulated batch's token count) replaces the batch's own
    assert kd_loss(logits, labels, teacher, None, temperature=2.0, alpha=0.0, n_tokens=4).item() == pytest.approx(
        ce / 4, rel=1e-6
    )


def test_kd_with_alpha_zero_trains_exactly_like_lora(tiny_recipe, tmp_path):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    outs = {}
    for name, method in (("lora", {"name": "lora"}), ("kd", {"name": "kd", "alpha": 0.0})):
        tiny_recipe["output_dir"] = str(tmp_path / name)
        pktransfer.run(_recipe(tiny_recipe, **method), quiet=True, evaluate=False)
        outs[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert outs["lora"].keys() == outs["kd"].keys()
    for k in outs["lora"]:
        assert torch.allclose(outs["lora"][k], outs["kd"][k], atol=1e-5), k


def test_kd_cached_and_live_teacher_agree_and_the_cache_is_reused(tiny_recipe, tmp_path, monkeypatch):
    from conftest import tiny_method_context

    from pktransfer.training import collate_examples

    cache_dir = tmp_path / "cache"
    losses = {}
    for name, extra in (("live", {"cache": False}), ("cached", {"cache": True, "top_k": None, "logits_cache": str(cache_dir)})):
        recipe = _recipe(tiny_recipe, name="kd", alpha=0.7, **extra)
        method, ctx = tiny_method_context(recipe, tmp_path / name)
        (tmp_path / name).mkdir()
        model = method.prepare(ctx)
        batch = collate_examples(ctx.examples[2:6], ctx.student.tokenizer.pad_token_id, first_index=2)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses[name] = method.training_loss(ctx)(out, batch, None).item()
    assert losses["live"] == pytest.approx(losses["cached"], rel=1e-5)
    assert len(list(cache_dir.glob("kd-logits-*.safetensors"))) == 1

    import pktransfer.methods.teacher_cache as teacher_cache

    monkeypatch.setattr(teacher_cache, "teacher_logits_at_responses", lambda *a, **k: pytest.fail("recomputed"))
    tiny_recipe["output_dir"] = str(tmp_path / "run")
    tiny_recipe["task"]["n_train"] = 8
    tiny_recipe["training"]["max_length"] = 64
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    import pktransfer.pipeline as pipeline

    loaded = []
    real_load = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda spec, **k: loaded.append(spec.model) or real_load(spec, **k))
    # a run over the same 8 examples finds the cache (the key is teacher + token ids + top_k) and never
    # loads the teacher
    res = pktransfer.run(_recipe(tiny_recipe, name="kd", alpha=0.7, top_k=None, logits_cache=str(cache_dir)), quiet=True)
    assert res.metrics["trained"]["test"]["n"] == 6
    assert loaded == [tiny_recipe["student"]["model"]]


# ---- PiSSA -----------------------------------------------------------------------------------------


def test_pissa_starts_at_the_students_top_singular_vectors(tiny_recipe, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_recipe["evaluation"].update(teacher=False, student=False)
    recipe = _recipe(tiny_recipe, name="pissa")
    from pktransfer.methods import get_method

    method = get_method(recipe.method)
    student = pktransfer.load_model(recipe.student)
    w = student.model.model.layers[0].mlp.up_proj.weight.detach().clone().float()
    from pktransfer.methods import MethodContext
    from pktransfer.progress import Progress

    ctx = MethodContext(recipe, student, None, None, tmp_path, Progress(quiet=True), lambda: None)
    model = method.prepare(ctx)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    s = layer.scaling["default"]
    ba = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    u, sig, vh = torch.linalg.svd(w, full_matrices=False)
    r = recipe.lora.r
    assert torch.allclose(ba, (u[:, :r] * sig[:r]) @ vh[:r], atol=1e-4)  # the principal part
    assert torch.allclose(layer.get_base_layer().weight + ba, w, atol=1e-4)  # base keeps the residual
    # end to end: the saved adapter is a plain LoRA on the unmodified student
    tiny_recipe["output_dir"] = str(tmp_path / "run")
    tiny_recipe["training"]["save_merged"] = True
    out = pktransfer.run(_recipe(tiny_recipe, name="pissa"), quiet=True).output_dir
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_student"]))
        adapted = PeftModel.from_pretrained(base, str(out / "adapter"))(input_ids=IDS).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))(input_ids=IDS).logits
    assert torch.allclose(adapted, merged, atol=1e-4)


# ---- weight selection ------------------------------------------------------------------------------


def test_space_indices_and_uniform_layers():
    idx = space_indices({"residual": 10, "mlp": 7}, {"residual": 4, "mlp": 7})
    assert idx["residual"].tolist() == [0, 3, 6, 9]
    assert idx["mlp"].tolist() == list(range(7))
    assert uniform_indices(5, 1).tolist() == [0]
    assert select_layers([0] * 8, 3, "uniform") == [0, 4, 7]  # round(0, 3.5, 7)
    assert select_layers([0] * 8, 3, "first") == [0, 1, 2]
    with pytest.raises(ValueError, match="larger"):
        space_indices({"residual": 4}, {"residual": 5})


def test_weight_selection_cuts_consistent_index_sets_and_keeps_step0(tiny_recipe, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from pktransfer.methods import MethodContext, get_method
    from pktransfer.methods.weight_selection import selected_matrices, selection_plan
    from pktransfer.progress import Progress

    recipe = _recipe(tiny_recipe, name="weight_selection", layers="uniform")
    teacher = pktransfer.load_model(recipe.teacher)
    student = pktransfer.load_model(recipe.student)
    layers, idx = selection_plan(teacher.arch, student.arch, "uniform")
    assert layers == [0, 3]
    mats = selected_matrices(teacher, student.arch, layers, idx, {"q", "o", "up", "down", "embed"})
    t = teacher.model.model
    hid, heads, mlp = idx["residual"], idx["heads"], idx["mlp"]
    assert torch.equal(mats["model.layers.1.self_attn.q_proj"], t.layers[3].self_attn.q_proj.weight[heads][:, hid])
    assert torch.equal(mats["model.layers.1.self_attn.o_proj"], t.layers[3].self_attn.o_proj.weight[hid][:, heads])
    assert torch.equal(mats["model.layers.0.mlp.down_proj"], t.layers[0].mlp.down_proj.weight[hid][:, mlp])
    assert torch.equal(mats["model.embed_tokens"], t.embed_tokens.weight[:, hid])
    assert mats["model.layers.0.mlp.up_proj"].shape == student.model.model.layers[0].mlp.up_proj.weight.shape

    method = get_method(recipe.method)
    ctx = MethodContext(recipe, student, None, None, tmp_path, Progress(quiet=True), lambda: teacher)
    model = method.prepare(ctx)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_student"]))(input_ids=IDS).logits
        got = model(input_ids=IDS).logits
    assert torch.allclose(ref, got, atol=1e-4)
    info = json.loads((tmp_path / "weight_selection.json").read_text())
    assert info["selected_layers"] == [0, 3]


def test_weight_selection_refuses_a_wider_student(tiny_recipe, tiny_models, tmp_path):
    tiny_recipe["teacher"]["model"], tiny_recipe["student"]["model"] = (
        str(tiny_models["qwen2_student"]),
        str(tiny_models["qwen2_teacher"]),
    )
    with pytest.raises(pktransfer.PktError, match="larger than the teacher"):
        pktransfer.run(_recipe(tiny_recipe, name="weight_selection"), quiet=True)
    assert not (tmp_path / "run").exists()
