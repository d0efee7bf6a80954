"""SemAlign: pairing rule, semantic bases, decompose/recompose, loss, attribution, and the method end to end."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import pktransfer
from pktransfer.errors import RecipeError
from pktransfer.ops.semantic import (
    alignment_terms,
    basis_rows,
    cosine_to_onehot,
    decompose,
    dual_map,
    gram_pinv,
    grid_layer,
    interpolate,
    interpolation,
    layer_pairs,
    map_activations,
    recompose,
    recompose_map,
    semantic_bases,
    student_layer_for,
    top_layers,
)
from pktransfer.recipe import recipe_from_dict

# ---- pairing rule ----------------------------------------------------------------------------------

# (L_T, L_S, l*, expected student layer k): worked by hand from l_k = max(1, floor(L_T/L_S·k))
PAIRING = [
    (28, 24, 1, 1),  # l_1 = floor(7/6) = 1
    (28, 24, 6, 6),  # l_5 = 5 < 6 <= l_6 = floor(42/6) = 7
    (28, 24, 7, 6),
    (28, 24, 8, 7),  # l_7 = floor(49/6) = 8
    (28, 24, 28, 24),
    (40, 32, 4, 4),  # Llama-2 13B -> 7B: l_3 = 3, l_4 = 5
    (40, 32, 5, 4),
    (40, 32, 40, 32),
    (4, 2, 1, 1),  # l_1 = 2, l_2 = 4
    (4, 2, 3, 2),
    (5, 2, 3, 2),  # l_1 = floor(2.5) = 2, l_2 = 5
    (3, 3, 2, 2),  # equal depth: the identity
]


@pytest.mark.parametrize(("n_t", "n_s", "critical", "k"), PAIRING)
def test_pairing_rule_against_hand_worked_cases(n_t, n_s, critical, k):
    assert student_layer_for(critical, n_t, n_s) == k


def test_grid_layers_and_bounds():
    assert [grid_layer(28, 24, k) for k in (1, 5, 6, 12, 24)] == [1, 5, 7, 14, 28]
    assert [grid_layer(2, 3, k) for k in (1, 2, 3)] == [1, 1, 2]  # max(1, ·) keeps layer 0 out
    with pytest.raises(ValueError):
        grid_layer(28, 24, 0)
    with pytest.raises(ValueError):
        student_layer_for(29, 28, 24)


# (L_T, L_S, k) -> (a, b, λ): u = L_T·k/L_S, a = clamp(floor(u), 1, L_T − 1), λ = clip(u − a, 0, 1)
INTERPOLATION = [
    (28, 24, 1, (1, 2, 1 / 6)),  # u = 7/6
    (28, 24, 6, (7, 8, 0.0)),  # u = 7, on the grid
    (28, 24, 24, (27, 28, 1.0)),  # u = 28: a clamps to 27, λ = 1 -> the last layer exactly
    (40, 32, 3, (3, 4, 0.75)),  # u = 15/4
    (4, 2, 1, (2, 3, 0.0)),  # integer ratio: every target is on the grid
    (5, 2, 1, (2, 3, 0.5)),  # u = 5/2
    (3, 4, 1, (1, 2, 0.0)),  # u = 3/4: a clamps up to 1, λ clips to 0
]


@pytest.mark.parametrize(("n_t", "n_s", "k", "expected"), INTERPOLATION)
def test_interpolation_weights(n_t, n_s, k, expected):
    a, b, lam = interpolation(n_t, n_s, k)
    assert (a, b) == expected[:2]
    assert lam == pytest.approx(expected[2], abs=1e-12)


def test_interpolate_mixes_with_lambda():
    ha, hb = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])
    assert torch.equal(interpolate(ha, hb, 0.0), ha)
    assert torch.equal(interpolate(ha, hb, 1.0), hb)
    assert torch.allclose(interpolate(ha, hb, 0.25), torch.tensor([0.75, 1.0]))


def test_layer_pairs_merge_critical_layers_that_choose_the_same_student_layer():
    pairs = layer_pairs([7, 6, 28], 28, 24)
    assert [(p.student, p.grid, p.a, p.b, p.critical) for p in pairs] == [(6, 7, 7, 8, (6, 7)), (24, 28, 27, 28, (28,))]
    assert pairs[1].weight_b == 1.0


def test_top_layers_are_one_based_in_depth_order():
    assert top_layers([0.1, 3.0, -1.0, 2.0, 3.0], 3) == [2, 4, 5]
    assert top_layers([1.0, 1.0, 1.0], 2) == [1, 2]  # ties: shallower first


# ---- semantic bases --------------------------------------------------------------------------------


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def test_square_orthogonal_head_round_trip_returns_the_input_direction():
    q = _orthogonal(6, 0)
    s = semantic_bases(q)
    assert torch.allclose(s, q, atol=1e-5)  # pinv(Qᵀ) = Q, rows already unit
    h = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    back = recompose(decompose(h, s), s)
    assert torch.allclose(back, h / h.norm(dim=-1, keepdim=True), atol=1e-5)


def test_square_invertible_head_with_scaled_rows_round_trip_returns_the_input_direction():
    # W = D Q is invertible but not orthogonal: pinv(Wᵀ) = D⁻¹ Q, whose unit rows are Q again
    q = _orthogonal(5, 2)
    w = torch.diag(torch.tensor([0.5, 2.0, 3.0, 0.1, 7.0])) @ q
    s = semantic_bases(w, chunk=2)
    assert torch.allclose(s, q, atol=1e-4)
    h = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    back = recompose(decompose(h, s), s)
    assert torch.allclose(back, h / h.norm(dim=-1, keepdim=True), atol=1e-4)


def test_bases_are_unit_rows_of_the_pseudo_inverse_for_a_tall_head_in_any_chunking():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(37, 8, generator=g)
    ref = torch.linalg.pinv(w.T.double()).float()  # [V, D]: row i is e_i · pinv(Wᵀ)
    ref = ref / ref.norm(dim=1, keepdim=True)
    for chunk in (1, 5, 37, 100):
        assert torch.allclose(semantic_bases(w, chunk=chunk), ref, atol=1e-5), chunk


def test_rank_deficient_head_and_zero_rows_stay_finite():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(20, 4, generator=g)
    w = torch.cat([w, w[:, :1]], dim=1)  # a repeated column: WᵀW is singular
    w[3] = 0.0  # a padding row
    s = semantic_bases(w)
    assert torch.isfinite(s).all()
    assert s[3].abs().max() == 0
    ref = torch.linalg.pinv(w.T.double()).float()
    ref = ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-12)
    assert torch.allclose(s, ref, atol=1e-4)


def test_chunked_recompose_map_equals_the_dense_product_and_the_explicit_round_trip():
    g = torch.Generator().manual_seed(6)
    w_t, w_s = torch.randn(50, 12, generator=g), torch.randn(50, 7, generator=g)
    s_t, s_s = semantic_bases(w_t), semantic_bases(w_s)
    dense = s_s.T @ s_t
    for chunk in (3, 50, 64):
        assert torch.allclose(recompose_map(w_t, w_s, chunk=chunk), dense, atol=1e-5)
    h = torch.randn(4, 12, generator=g)
    explicit = recompose(decompose(h, s_t), s_s)  # a = S_T h / ||h||, h~ = S_Sᵀ a
    assert torch.allclose(map_activations(h, dense), explicit, atol=1e-5)
    with pytest.raises(ValueError, match="shared vocabulary"):
        recompose_map(w_t, w_s[:40])


def test_dual_map_is_exact_within_one_model_where_the_paper_v1_round_trip_is_not():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(40, 6, generator=g)  # tall head, full column rank
    h = torch.randn(5, 6, generator=g)
    for chunk in (7, 40):
        assert torch.allclose(dual_map(w, w, chunk=chunk), torch.eye(6), atol=1e-4)  # W⁺W = I
    unit = h / h.norm(dim=-1, keepdim=True)
    assert torch.allclose(map_activations(h, dual_map(w, w)), unit, atol=1e-4)
    v1 = torch.nn.functional.cosine_similarity(map_activations(h, recompose_map(w, w)), h, dim=-1)
    assert v1.min() < 0.999  # the paper's unit-normalised bases do not round-trip a tall head exactly


def test_dual_map_by_hand_across_a_pair():
    # W_T = [[1, 0], [0, 2], [1, 1]] (V 3, D_T 2), W_S = [[1], [0], [1]] (D_S 1):
    # W_SᵀW_T = [1 + 1, 0 + 1] = [2, 1]; W_SᵀW_S = 2, so M = [[1, 0.5]]
    w_t = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    w_s = torch.tensor([[1.0], [0.0], [1.0]])
    assert torch.allclose(dual_map(w_t, w_s, chunk=2), torch.tensor([[1.0, 0.5]]), atol=1e-6)
    with pytest.raises(ValueError, match="shared vocabulary"):
        dual_map(w_t, w_s[:2])


def test_basis_rows_use_the_models_own_gram():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(30, 6, generator=g)
    rows = basis_rows(w[10:15], gram_pinv(w))
    assert torch.allclose(rows, semantic_bases(w)[10:15], atol=1e-6)


# ---- the loss --------------------------------------------------------------------------------------


def test_cosine_to_onehot_by_hand():
    z = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert torch.allclose(cosine_to_onehot(z, torch.tensor([1, 1])), torch.tensor([0.8, 0.0]))


def test_loss_is_zero_at_a_perfect_match_and_sums_over_positions():
    g = torch.Generator().manual_seed(8)
    targets = [torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)]
    acts = [3.0 * targets[0], 0.5 * targets[1]]  # cosine ignores positive scale
    y = torch.tensor([0, 2, 1, 2])
    logits = 5.0 * torch.nn.functional.one_hot(y, 3).float()
    act, logit = alignment_terms(acts, targets, logits, y)
    assert act.item() == pytest.approx(0.0, abs=1e-6)
    assert logit.item() == pytest.approx(0.0, abs=1e-6)
    # opposite directions: 1 − cos = 2 at every position, averaged over layers, summed over 4 positions
    act, _ = alignment_terms([-targets[0], -targets[1]], targets, logits, y)
    assert act.item() == pytest.approx(8.0, rel=1e-5)
    # uniform logits: cos(z, e_y) = 1/√3 at every position
    _, logit = alignment_terms(acts, targets, torch.ones(4, 3), y)
    assert logit.item() == pytest.approx(4 * (1 - 1 / math.sqrt(3)), rel=1e-5)


# ---- attribution ------------------------------------------------------------------------------------


def test_layer_attribution_equals_the_derivative_of_the_loss_under_scaling_each_layer_output(tiny_models):
    """Σ h·∂L/∂h = d/dε L(h·(1 + ε)) at ε = 0: checked by central differences, independently of autograd."""
    from pktransfer.data import PromptFormatter, encode_items, get_task
    from pktransfer.methods.semalign import layer_attribution
    from pktransfer.models import load_model
    from pktransfer.progress import Progress
    from pktransfer.recipe import ModelSpec

    teacher = load_model(ModelSpec(model=str(tiny_models["qwen2_teacher"]), dtype="float32"))
    model = teacher.model.double()
    task = get_task("arithmetic", {"sizes": {"seed": 3, "train": 1, "test": 1}})
    examples = encode_items(PromptFormatter(teacher.tokenizer), task.split("seed"), 64, "seed")
    batched = layer_attribution(model, "model.layers", 4, examples, batch_size=3, progress=Progress(quiet=True))
    single = layer_attribution(model, "model.layers", 4, examples, batch_size=1, progress=Progress(quiet=True))
    assert batched == pytest.approx(single, rel=1e-6, abs=1e-9)

    def mean_loss(layer: int, eps: float) -> float:
        def scale(mod, args, out):
            return (out[0] * (1 + eps), *out[1:]) if isinstance(out, tuple) else out * (1 + eps)

        handle = model.model.layers[layer].register_forward_hook(scale)
        total = 0.0
        with torch.no_grad():
            for e in examples:
                ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
                logits = model(input_ids=ids).logits
                total += torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100).item()
        handle.remove()
        return total / len(examples)

    # rotary tables stay float32 in a float64 model, so the loss is exact to ~1e-8 only: a larger step
    # keeps that noise below 1e-5 while its O(eps²) truncation error stays smaller still
    eps = 1e-3
    for layer in range(4):
        fd = (mean_loss(layer, eps) - mean_loss(layer, -eps)) / (2 * eps)
        assert batched[layer] == pytest.approx(fd, rel=1e-3, abs=1e-5), layer
    assert all(p.requires_grad for p in model.parameters())  # restored


# ---- the method -------------------------------------------------------------------------------------


def _recipe(base: dict, **method):
    return recipe_from_dict({**base, "method": {"name": "semalign", **method}})


def test_recipe_validation():
    with pytest.raises(RecipeError, match="critical_layers"):
        recipe_from_dict({"method": {"name": "semalign", "critical_layers": 0}})
    with pytest.raises(RecipeError, match="nothing to train"):
        recipe_from_dict({"method": {"name": "semalign", "activation_weight": 0, "logit_weight": 0}})
    with pytest.raises(RecipeError, match="point"):
        recipe_from_dict({"method": {"name": "semalign", "point": "residual"}})


def test_semalign_runs_end_to_end_and_saves_a_lora_on_the_paired_layers(tiny_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = pktransfer.run(_recipe(tiny_recipe, critical_layers=1), quiet=True)
    out = res.output_dir
    info = res.run["method"]
    assert len(info["pairs"]) == 1
    pair = info["pairs"][0]
    # the tiny pair: L_T 4, L_S 2; the critical layer l* maps to k = 1 (l* <= 2) or 2
    assert pair["student"] == (1 if info["critical_teacher_layers"][0] <= 2 else 2)
    assert (pair["a"], pair["weight_b"]) == (
        2 * pair["student"] if pair["student"] == 1 else 3,
        0.0 if pair["student"] == 1 else 1.0,
    )
    attribution = json.loads((out / "semalign" / "attribution.json").read_text())
    assert len(attribution["scores"]) == 4 and attribution["n_samples"] == 4
    assert (out / "semalign" / "attribution.png").stat().st_size > 0
    assert res.metrics["trained"]["test"]["n"] == 6
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    layers = {int(k.split("layers.")[1].split(".")[0]) for k in tensors}
    leaves = {k.split(".lora_")[0].rsplit(".", 1)[1] for k in tensors}
    assert layers == {pair["student"] - 1}
    assert leaves == {"up_proj", "down_proj", "v_proj", "o_proj"}
    base = AutoModelForCausalLM.from_pretrained(tiny_recipe["student"]["model"])
    PeftModel.from_pretrained(base, str(out / "adapter"))
    # no hook is left on the student once training ended
    losses = [h["loss"] for h in json.loads((out / "checkpoints" / "log_history.json").read_text()) if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)


def test_cached_and_live_targets_give_the_same_loss_and_the_cache_is_reused(tiny_recipe, tmp_path):
    from conftest import tiny_method_context

    from pktransfer.training import collate_examples

    cache_dir = tmp_path / "cache"
    losses = {}
    for name, extra in (("live", {"cache": False}), ("cached", {"cache": True}), ("again", {"cache": True})):
        recipe = _recipe(tiny_recipe, critical_layers="all", cache_dir=str(cache_dir), **extra)
        method, ctx = tiny_method_context(recipe, tmp_path / name)
        model = method.prepare(ctx)
        assert [p.student for p in method.pairs] == [1, 2]
        model.train()
        batch = collate_examples(ctx.examples[2:6], ctx.student.tokenizer.pad_token_id, first_index=2)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = method.training_loss(ctx)(out, batch, None)
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
        losses[name] = loss.item()
        method.finish_training()
        # hooks are gone: a forward in training mode captures nothing
        model(input_ids=batch["input_ids"])
        assert not method._acts
    assert losses["live"] == pytest.approx(losses["cached"], rel=1e-3)  # targets are stored in float16
    assert losses["cached"] == losses["again"]
    assert len(list(cache_dir.glob("semalign-targets-*.safetensors"))) == 1
    assert len(list(cache_dir.glob("semantic-pinv-*.safetensors"))) == 2
    assert len(list(cache_dir.glob("semantic-map-*.safetensors"))) == 1
    assert 0 < losses["live"] < 4


def test_dual_decomposition_and_kl_output_loss_cached_equals_live_and_share_kds_cache(tiny_recipe, tmp_path):
    from conftest import tiny_method_context

    from pktransfer.training import collate_examples

    cache_dir, logits_dir = tmp_path / "cache", tmp_path / "kd-logits"
    losses = {}
    for name, extra in (("live", {"cache": False}), ("cached", {"cache": True, "logits_cache": str(logits_dir)})):
        recipe = _recipe(tiny_recipe, decomposition="dual", output_loss="kl", top_k=None, cache_dir=str(cache_dir), **extra)
        method, ctx = tiny_method_context(recipe, tmp_path / name)
        model = method.prepare(ctx)
        assert method.report()["map"]["decomposition"] == "dual"
        batch = collate_examples(ctx.examples[2:6], ctx.student.tokenizer.pad_token_id, first_index=2)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses[name] = method.training_loss(ctx)(out, batch, None).item()
        method.finish_training()
    assert losses["live"] == pytest.approx(losses["cached"], rel=1e-3)
    assert len(list(cache_dir.glob("semantic-map-dual-*.safetensors"))) == 1
    assert all(p.name.startswith("semantic-map-dual-") for p in cache_dir.glob("semantic-map-*"))
    # the same file name and key as KD's cache: one grid computes the teacher's logits once
    assert len(list(logits_dir.glob("kd-logits-*.safetensors"))) == 1
    kd_recipe = _recipe(tiny_recipe, name="kd", top_k=None, logits_cache=str(logits_dir))
    import pktransfer.methods.teacher_cache as teacher_cache

    real = teacher_cache.teacher_logits_at_responses
    try:
        teacher_cache.teacher_logits_at_responses = lambda *a, **k: pytest.fail("recomputed")
        kd, kd_ctx = tiny_method_context(kd_recipe, tmp_path / "kd")
        kd.prepare(kd_ctx)
    finally:
        teacher_cache.teacher_logits_at_responses = real


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("output_loss", "cache"), [("onehot_cosine", True), ("kl", True), ("kl", False)])
def test_the_loss_on_logits_at_response_positions_only_equals_the_full_one(tiny_recipe, tmp_path, output_loss, cache, tied):
    """The LM head runs only where a response token is predicted (``logits_to_keep``, as KD's losses; with live
    teacher logits the teacher's head too): the same loss and the same LoRA gradients as with the logits at every
    position, on an untied pair and on a tied one (the head is the embedding matrix, as in the offline pair)."""
    from conftest import STUDENT_SHAPE, TEACHER_SHAPE, save_tiny, tiny_method_context

    from pktransfer.training import collate_examples, kept_positions

    if tied:
        tiny_recipe["teacher"]["model"] = str(save_tiny(tmp_path, "t", "qwen2", seed=1, tied=True, **TEACHER_SHAPE))
        tiny_recipe["student"]["model"] = str(save_tiny(tmp_path, "s", "qwen2", seed=2, tied=True, **STUDENT_SHAPE))
    recipe = _recipe(
        tiny_recipe, critical_layers="all", output_loss=output_loss, top_k=None, cache=cache, cache_dir=str(tmp_path / "c")
    )
    method, ctx = tiny_method_context(recipe, tmp_path / "run")
    model = method.prepare(ctx)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) is tied
    model.train()
    batch = collate_examples(ctx.examples[2:6], ctx.student.tokenizer.pad_token_id, first_index=2)
    loss_fn = method.training_loss(ctx)
    assert loss_fn.response_logits
    keep = kept_positions(batch["labels"])
    assert 0 < len(keep) < batch["input_ids"].shape[1] - 1  # some positions are left out
    results = []
    for extra in ({}, {"logits_to_keep": keep}):
        torch.manual_seed(0)  # the same dropout masks
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        assert out.logits.shape[1] == (len(keep) if extra else batch["input_ids"].shape[1])
        loss = loss_fn(out, {**batch, **({"logits_positions": keep} if extra else {})}, None)
        lora = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        results.append((loss.detach(), torch.autograd.grad(loss, lora)))
    (full, g_full), (kept, g_kept) = results
    assert torch.equal(full, kept) and all(torch.equal(a, b) for a, b in zip(g_full, g_kept, strict=True))
    method.finish_training()


@pytest.mark.parametrize("point", ["mlp", "attention", "layer"])
def test_targets_at_every_point_match_a_full_forward(tiny_models, point):
    """Targets from the early-stopped teacher forward equal those computed from a whole forward pass."""
    from pktransfer.data import PromptFormatter, encode_items, get_task
    from pktransfer.methods.semalign import capture, lm_head, sublayer, teacher_targets
    from pktransfer.models import load_model
    from pktransfer.ops.semantic import layer_pairs
    from pktransfer.recipe import ModelSpec
    from pktransfer.training import collate_examples, response_positions

    t = load_model(ModelSpec(model=str(tiny_models["qwen2_teacher"])))
    s = load_model(ModelSpec(model=str(tiny_models["qwen2_student"])))
    m = recompose_map(lm_head(t, 100), lm_head(s, 100))
    task = get_task("arithmetic", {"sizes": {"train": 3, "test": 1}})
    ex = encode_items(PromptFormatter(t.tokenizer), task.split("train"), 64, "train")
    b = collate_examples(ex)
    pairs = layer_pairs([1, 4], 4, 2)  # student 1 <- teacher 2 (3 with λ 0), student 2 <- teacher 4 (λ 1)
    got = teacher_targets(t, pairs, point, m, b["input_ids"], b["attention_mask"], b["labels"])
    acts = {}
    with torch.no_grad(), capture({i: sublayer(t.model, t.arch, i, point) for i in range(4)}, acts):
        t.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    mask = response_positions(b["labels"])
    for p, g in zip(pairs, got, strict=True):
        h = interpolate(acts[p.a - 1], acts[p.b - 1], p.weight_b)[:, :-1][mask]
        want = map_activations(h, m)
        assert torch.allclose(g, want / want.norm(dim=-1, keepdim=True), atol=1e-5)


def test_shallow_to_deep_trains_one_pair_after_the_other(tiny_recipe):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(_recipe(tiny_recipe, critical_layers="all", schedule="shallow_to_deep"), quiet=True, evaluate=False)
    ckpt = load_file(str(res.output_dir / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    final = load_file(str(res.output_dir / "adapter" / "adapter_model.safetensors"))

    def b_norm(tensors, layer):
        return sum(float(v.abs().sum()) for k, v in tensors.items() if f"layers.{layer}." in k and "lora_B" in k)

    # steps 0-1 train pair 1 (student layer 0) only; LoRA B starts at zero
    assert b_norm(ckpt, 0) > 0 and b_norm(ckpt, 1) == 0
    assert b_norm(final, 0) > 0 and b_norm(final, 1) > 0


def test_semalign_refuses_a_pair_with_different_vocabularies(tiny_recipe, tmp_path):
    """Another tokenizer is refused; an output layer merely padded beyond the shared tokenizer is accepted
    (tests/test_distill.py runs SemAlign with such a teacher)."""
    from conftest import TEACHER_SHAPE, make_model, make_tokenizer

    from pktransfer.errors import IncompatiblePairError

    odd = tmp_path / "odd"
    tok = make_tokenizer()
    tok.add_tokens(["<another_token>"])
    make_model("qwen2", vocab=len(tok), seed=9, **TEACHER_SHAPE).save_pretrained(odd)
    tok.save_pretrained(odd)
    tiny_recipe["teacher"]["model"] = str(odd)
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    with pytest.raises(IncompatiblePairError, match="vocabularies"):
        pktransfer.run(_recipe(tiny_recipe), quiet=True)
    assert not (tmp_path / "run").exists()


# ---- SemAlign v2 (arXiv 2510.24208 v2; ACL 2026 Findings) ----------------------------------------------------


def test_v2_picks_exactly_one_source_per_target_within_its_depth_window():
    from pktransfer.ops.semantic import one_source_per_target

    # L_T 6, L_S 4: grid l_k = 1, 3, 4, 6 -> windows {1}, {2, 3}, {4}, {5, 6}
    assert one_source_per_target([0.1, 0.5, 0.2, 0.3, 0.9, 0.1], 6, 4) == [1, 2, 4, 5]
    assert one_source_per_target([0.0] * 6, 6, 4) == [1, 3, 4, 6]  # ties: the deepest, the grid layer
    assert one_source_per_target([3, 2, 1], 3, 3) == [1, 2, 3]  # equal depths: layer to layer
    # 28 -> 24 (the offline pair): one source per target, strictly deeper each time, every source in its window
    scores = [float((7 * j) % 11) for j in range(28)]
    sources = one_source_per_target(scores, 28, 24)
    assert len(sources) == 24 and all(a < b for a, b in itertools.pairwise(sources))
    with pytest.raises(ValueError):
        one_source_per_target([0.0] * 3, 3, 4)


def test_relation_geometry_is_invariant_to_rotation_translation_and_scale_of_either_side():
    from pktransfer.ops.semantic import centred_gram, relation_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    shift = torch.randn(1, 5, generator=g, dtype=torch.float64)
    gram = centred_gram(x)
    assert torch.allclose(gram.norm(), torch.tensor(1.0, dtype=gram.dtype))
    for same in (x @ q, x + shift, 3.0 * x, 3.0 * (x @ q) + shift):
        assert torch.allclose(centred_gram(same), gram, atol=1e-6)
        assert float(relation_distance(same, gram)) == pytest.approx(0.0, abs=1e-10)
    # the student side may be narrower: only the token-token geometry is compared
    wide = torch.cat([x @ q, torch.zeros(7, 3, dtype=x.dtype)], dim=1) + 1.0
    assert float(relation_distance(wide, gram)) == pytest.approx(0.0, abs=1e-10)
    # by hand: centred rows [-1], [1] -> G = [[1, -1], [-1, 1]] / 2
    assert torch.allclose(centred_gram(torch.tensor([[0.0], [2.0]])), torch.tensor([[1.0, -1.0], [-1.0, 1.0]]) / 2)
    other = torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert 0 < float(relation_distance(other, gram)) <= 4


def test_the_fisher_quadratic_is_the_second_order_term_of_the_kl():
    from pktransfer.ops.semantic import fisher_quadratic

    g = torch.Generator().manual_seed(1)
    z_t = torch.randn(3, 9, generator=g, dtype=torch.float64)
    d = torch.randn(3, 9, generator=g, dtype=torch.float64)
    p = torch.softmax(z_t, -1)
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    explicit = 0.5 * torch.einsum("ni,nij,nj->n", d, fisher, d)
    assert torch.allclose(fisher_quadratic(z_t + d, z_t).double(), explicit, atol=1e-6)
    eps = 1e-3  # KL(p_T ‖ softmax(z_T + ε d)) = ε²·½ dᵀFd + O(ε³)
    kl = (p * (torch.log_softmax(z_t, -1) - torch.log_softmax(z_t + eps * d, -1))).sum(-1)
    assert torch.allclose(kl, eps**2 * explicit, rtol=1e-2)
    assert torch.allclose(fisher_quadratic(z_t + 5.0, z_t).double(), torch.zeros(3, dtype=torch.float64), atol=1e-5)


def test_v2_settings_are_checked():
    spec = recipe_from_dict({"method": {"name": "semalign", "version": "v2"}}).method
    assert (spec.schedule, spec.output_loss, spec.point) == ("shallow_to_deep", "kl", "layer")
    for bad, match in (
        ({"version": "v2", "schedule": "joint"}, "v2 uses schedule: shallow_to_deep"),
        ({"version": "v2", "critical_layers": 2}, "leave critical_layers unset"),
        ({"version": "v2", "output_loss": "onehot_cosine"}, "v2 uses output_loss: kl"),
        ({"layer_objective": "fisher"}, "set version: v2"),
    ):
        with pytest.raises(RecipeError, match=match):
            recipe_from_dict({"method": {"name": "semalign", **bad}})


@pytest.mark.parametrize("objective", ["relation", "fisher"])
def test_v2_cached_and_live_targets_give_the_same_loss(tiny_recipe, tmp_path, objective):
    from conftest import tiny_method_context

    from pktransfer.training import collate_examples

    losses = {}
    for name, cache in (("live", False), ("cached", True)):
        recipe = _recipe(
            tiny_recipe, version="v2", layer_objective=objective, cache=cache, cache_dir=str(tmp_path / "c"), top_k=None
        )
        method, ctx = tiny_method_context(recipe, tmp_path / name)
        model = method.prepare(ctx)
        assert [(p.student, p.a) for p in method.pairs] == [(1, method.pairs[0].a), (2, method.pairs[1].a)]
        assert method.pairs[0].a in (1, 2) and method.pairs[1].a in (3, 4)  # one source per target, in its window
        method.set_phase(1)  # the deeper frontier
        model.train()
        batch = collate_examples(ctx.examples[2:6], ctx.student.tokenizer.pad_token_id, first_index=2)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = method.training_loss(ctx)(out, batch, None)
        loss.backward()
        grads = {
            int(n.split("layers.")[1].split(".")[0])
            for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None and p.grad.abs().sum() > 0
        }
        assert grads == {1}  # only the frontier layer's LoRA receives gradients
        losses[name] = loss.item()
        method.finish_training()
    assert losses["live"] == pytest.approx(losses["cached"], rel=2e-3) and losses["live"] > 0


def test_v2_trains_only_the_frontier_layer_in_each_stage(tiny_recipe, monkeypatch):
    from transformers import TrainerCallback

    from pktransfer.methods.semalign import SemAlignMethod

    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})

        def on_train_begin(self, args, state, control, model=None, **kw):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})

    callbacks = SemAlignMethod.callbacks
    monkeypatch.setattr(SemAlignMethod, "callbacks", lambda self, ctx: [*callbacks(self, ctx), Snapshot()])
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["training"].update(max_steps=4, save_steps=50, warmup_ratio=0.0)  # no zero-rate first step
    res = pktransfer.run(_recipe(tiny_recipe, version="v2"), quiet=True, evaluate=False)
    assert res.run["method"]["version"] == "v2" and len(res.run["method"]["pairs"]) == 2
    assert len(snapshots) == 5  # before training, then after each of the 4 steps (2 per stage)

    def changed(a: dict, b: dict) -> set[int]:
        return {int(n.split("layers.")[1].split(".")[0]) for n in a if not torch.equal(a[n], b[n])}

    assert [changed(snapshots[i], snapshots[i + 1]) for i in range(4)] == [{0}, {0}, {1}, {1}]


@pytest.mark.parametrize(
    "method",
    [
        {"critical_layers": "all", "decomposition": "dual", "output_loss": "kl"},
        {"version": "v2", "layer_objective": "relation", "top_k": None},
    ],
    ids=["v1", "v2"],
)
def test_activation_checkpointing_recomputes_the_hooked_layers_without_changing_training(
    tiny_recipe, tmp_path, method, monkeypatch
):
    """SemAlign's forward hooks capture the student's layer outputs with their graph; under activation checkpointing
    the layers run again during backward (the hooks fire again). Two steps with and without it train the same LoRA."""
    import math

    from safetensors.torch import load_file
    from transformers import modeling_utils

    import pktransfer

    calls = {"n": 0}
    checkpoint = modeling_utils.checkpoint

    def counted(*args, **kwargs):
        calls["n"] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counted)  # what the layers call when checkpointing is on
    tiny_recipe["training"].update(max_steps=2, fused_step=False)
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    adapters, layer_runs = {}, {}
    for ckpt in (False, True):
        tiny_recipe["training"]["gradient_checkpointing"] = ckpt
        tiny_recipe["output_dir"] = str(tmp_path / f"ckpt-{ckpt}")
        recipe = _recipe(tiny_recipe, cache=False, **method)
        calls["n"] = 0
        res = pktransfer.run(recipe, quiet=True, evaluate=False)
        layer_runs[ckpt] = calls["n"]
        assert math.isfinite(res.run["training"]["final_loss"])
        adapters[ckpt] = load_file(str(res.output_dir / "adapter" / "adapter_model.safetensors"))
    assert layer_runs[False] == 0 and layer_runs[True] > 0  # checkpointing was on: the layers ran checkpointed
    assert adapters[True].keys() == adapters[False].keys()
    for name, w in adapters[False].items():
        assert torch.allclose(adapters[True][name], w, atol=1e-6), name
    assert any(w.abs().sum() > 0 for n, w in adapters[False].items() if "lora_B" in n)  # it trained


def test_the_head_fingerprint_reads_the_head_in_chunks_and_sees_one_changed_weight():
    from pktransfer.methods.semalign import head_fingerprint
    from pktransfer.plan import LiveBytes

    head = torch.randn(20_000, 64).to(torch.bfloat16)
    with LiveBytes() as live:
        fp = head_fingerprint(head, chunk=1000)
    # float64 sums over 1,000 rows at a time: never a float64 copy of the whole head (10.2 MB), let alone two
    assert live.peak < head.numel() * 8 / 4, live.peak
    assert fp == head_fingerprint(head.clone(), chunk=1000)
    changed = head.clone()
    changed[12_345, 7] += 1.0  # a row the strided sample does not read: only the sums see it
    assert head_fingerprint(changed, chunk=1000) != fp


def test_the_attribution_batch_is_its_own_setting_in_the_run_and_the_plan(tiny_recipe, tmp_path, monkeypatch):
    from conftest import tiny_method_context

    import pktransfer.methods.semalign as semalign_module
    from pktransfer.plan import make_plan

    seen = []
    attribution = semalign_module.layer_attribution

    def recording(*args, batch_size, **kwargs):
        seen.append(batch_size)
        return attribution(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(semalign_module, "layer_attribution", recording)
    recipe = _recipe(tiny_recipe, attribution_batch_size=1, cache=False)
    method, ctx = tiny_method_context(recipe, tmp_path / "run")
    method.prepare(ctx)
    assert seen == [1]

    def attribution_term(size: int | None) -> int:
        stages = make_plan(_recipe(tiny_recipe, attribution_batch_size=size), "cpu").stages
        (prepare,) = [s for s in stages if s.name == "prepare"]
        return prepare.terms["teacher backward for layer attribution, or forward for targets (traced)"]

    assert attribution_term(1) < attribution_term(None)  # the attribution (4 seed rows at once) is the larger term
