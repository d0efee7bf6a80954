"""LaTen: neuron scores on hand-built cases, hypernetwork shapes, injection = merge, the merged student, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import pktransfer
from pktransfer.errors import DataError
from pktransfer.methods.laten import step_batch
from pktransfer.ops.hypernet import HyperNet, Injection, choose_step, delta_penalty, mapped_deltas
from pktransfer.ops.location import locate_scores, plan_transfer
from pktransfer.ops.neurons import candidate_vocab, kv_rows, neuron_scores, restrict, sublayer_score
from pktransfer.ops.ranking import top_k
from pktransfer.recipe import recipe_from_dict

# ---- scores by hand ----------------------------------------------------------------------------------


def test_neuron_scores_by_hand_with_an_identity_lens():
    head = torch.eye(3)  # logits = h (identity norm and head)
    base = torch.zeros(3)
    directions = torch.tensor([[5.0, 0, 0], [-1.0, 0, 0], [0, 2.0, 0]])
    coeffs = torch.tensor([1.0, 1.0, 0.5])
    got = neuron_scores(base, coeffs, directions, lambda x: x, head, 0, chunk=2)
    log3 = math.log(3)
    expected = [5 - math.log(math.exp(5) + 2) + log3, -1 - math.log(math.exp(-1) + 2) + log3, 0 - math.log(2 + math.e) + log3]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert top_k(got, 2).tolist() == [0, 2]
    assert sublayer_score(base, directions[0], lambda x: x, head, 0) == pytest.approx(expected[0], abs=1e-6)


def test_restricted_vocabulary_is_exact_when_it_covers_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    head, base = torch.randn(50, 8, generator=g), torch.randn(8, generator=g)
    coeffs, dirs = torch.randn(20, generator=g), torch.randn(20, 8, generator=g)
    norm = torch.nn.RMSNorm(8)
    exact = neuron_scores(base, coeffs, dirs, norm, head, 7)
    assert candidate_vocab([base], norm, head, 7, 50) is None
    vocab = candidate_vocab([base], norm, head, 7, 10)
    assert 7 in vocab.tolist() and len(vocab) <= 11
    sub, yi = restrict(head, 7, vocab)
    approx = neuron_scores(base, coeffs, dirs, norm, sub, yi)
    assert torch.corrcoef(torch.stack([exact, approx]))[0, 1] > 0.9  # a close, cheaper ranking


def test_kv_rows_follow_grouped_query_attention():
    # 4 heads sharing 2 kv heads, head_dim 3: positions -> (head, dim) -> kv row
    assert kv_rows(torch.tensor([0, 2, 3, 7, 11]), 4, 2, 3).tolist() == [0, 2, 0, 4, 5]
    assert kv_rows(torch.tensor([5]), 2, 2, 3).tolist() == [5]  # no grouping: the identity


def _plant(model, layer: int, y: int, role: str, j: int, sign: float) -> None:
    """Make neuron j of ``layer`` write along a direction that raises y through the final norm (``sign``:
    that of the neuron's activation, so activation times column points the right way)."""
    lm = model.lm_head.weight.detach()
    g = model.model.norm.weight.detach()
    direction = lm[y] / g
    direction = sign * 50 * direction / direction.norm()
    blk = model.model.layers[layer]
    w = blk.mlp.down_proj.weight if role == "ffn" else blk.self_attn.o_proj.weight
    with torch.no_grad():
        w[:, j] = direction


@pytest.mark.parametrize("attn_score", ["self_subvalue", "o_input"])
def test_locate_finds_a_planted_neuron_in_a_tiny_model(tiny_models, attn_score):
    from pktransfer.data import PromptFormatter, get_task
    from pktransfer.methods.laten import answer_input
    from pktransfer.models import load_model
    from pktransfer.progress import Progress
    from pktransfer.recipe import ModelSpec

    loaded = load_model(ModelSpec(model=str(tiny_models["qwen2_teacher"])))
    task = get_task("arithmetic", {"sizes": {"extract": 1, "train": 1, "test": 1}})
    inp = answer_input(PromptFormatter(loaded.tokenizer), task.split("extract")[0])
    pos, y = len(inp.ids) - 1, inp.y
    # the sign of a planted neuron's activation decides its direction: read the activations first. The official
    # attention coefficient of (head 0, dim 5) is a[0, pos, pos] x v[pos, 5] (kv head 0): the sign of v's row 5
    acts = {}
    last = loaded.model.model.layers[3]
    h1 = last.mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.__setitem__("ffn", a[0][0, pos]))
    if attn_score == "o_input":
        h2 = last.self_attn.o_proj.register_forward_pre_hook(lambda m, a: acts.__setitem__("attn", a[0][0, pos]))
    else:
        h2 = last.self_attn.v_proj.register_forward_hook(lambda m, a, out: acts.__setitem__("attn", out[0, pos]))
    with torch.no_grad():
        loaded.model(input_ids=torch.tensor([list(inp.ids)]))
    h1.remove()
    h2.remove()
    for role, j in (("ffn", 77), ("attn", 5)):
        _plant(loaded.model, 3, y, role, j, 1.0 if acts[role][j] >= 0 else -1.0)
    scores = locate_scores(loaded, [inp], vocab_k=None, progress=Progress(quiet=True), what="teacher", attn_score=attn_score)[0]
    assert top_k(scores["ffn"][3], 1).item() == 77
    assert top_k(scores["attn"][3], 1).item() == 5
    assert scores["ffn"][3, 77] > 0 and scores["attn"][3, 5] > 0  # log-probability gained
    assert scores["ffn_layer"][3] > 0
    assert scores["ffn"].shape == (4, 128) and scores["attn"].shape == (4, 64)
    assert loaded.model.config._attn_implementation != "eager" or attn_score == "o_input"  # restored afterwards


def test_self_subvalue_hand_computed():
    from pktransfer.ops.location import self_subvalue

    # 4 heads of dim 2 over 2 kv heads: heads 0,1 read kv head 0, heads 2,3 kv head 1
    v = torch.tensor([1.0, -2.0, 3.0, 4.0])
    a = torch.tensor([0.5, 0.25, 1.0, 0.0])
    assert self_subvalue(a, v, 4, 2).tolist() == [0.5, -1.0, 0.25, -0.5, 3.0, 4.0, 0.0, 0.0]


def test_official_orders_match_datasets_and_the_partner_draw():
    import random

    import numpy as np

    datasets = pytest.importorskip("datasets")
    from pktransfer.methods.laten import datasets_shuffle_orders, step_batch

    np.random.seed(42)  # the official set_seed, then two shuffles without a seed (train_LaTen.py L142-146)
    a = datasets.Dataset.from_dict({"i": list(range(20))}).shuffle()
    b = datasets.Dataset.from_dict({"i": list(range(80))}).shuffle()
    assert datasets_shuffle_orders(42, [20, 80]) == [a["i"], b["i"]]
    extract, align = [f"e{i}" for i in range(20)], [f"a{i}" for i in range(80)]
    batch = step_batch(3, extract, align, 15, seed=7)  # official: independent of the recipe seed
    random.seed(3)
    assert batch == [align[i] for i in random.sample(range(80), 15)] + ["e3"]
    assert step_batch(3, extract, align, 15, seed=7, order="file")[0] == "e3"


def test_neuron_counts_floor_as_the_official_int():
    from pktransfer.ops.location import plan_transfer

    class A:
        n_layers, intermediate_size, n_heads, head_dim = 1, 11008, 32, 128

    t = {"ffn_layer": torch.ones(1), "attn_layer": torch.ones(1), "ffn": torch.rand(1, 11008), "attn": torch.rand(1, 4096)}
    assert plan_transfer(t, t, A, A, 0.1)["ffn"]["n"] == 1100  # int(1100.8)
    assert plan_transfer(t, t, A, A, 0.1, "round")["ffn"]["n"] == 1101


def test_scores_are_rounded_to_four_decimals_before_ranking_as_the_official_code():
    """knowledge_neurons.py L202/L271: round(score, 4) into a float32 table, then argsort: 0.12341 and 0.12344 tie."""
    from pktransfer.ops.location import plan_transfer, rounded_scores
    from pktransfer.ops.ranking import top_k

    s = torch.tensor([0.12341, 0.12344, 0.5, -0.00004], dtype=torch.float64)
    assert rounded_scores(s, 4).tolist() == torch.tensor([0.1234, 0.1234, 0.5, -0.0], dtype=torch.float32).tolist()
    assert rounded_scores(s, None) is s
    assert top_k(s, 2).tolist() == [2, 1] and top_k(rounded_scores(s, 4), 2).tolist() == [2, 0]  # the tie: lower index

    class A:
        n_layers, intermediate_size, n_heads, head_dim = 1, 40, 1, 4

    t = {"ffn_layer": torch.ones(1), "attn_layer": torch.ones(1), "ffn": torch.zeros(1, 40), "attn": s[None]}
    assert plan_transfer(t, t, A, A, 0.5, decimals=4)["attn"]["student"][0].tolist() == [2, 0]
    assert plan_transfer(t, t, A, A, 0.5)["attn"]["student"][0].tolist() == [2, 1]


# ---- align / inject ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d_t", "d_s"), [(64, 32), (1536, 896), (5, 7), (16, 16)])
def test_hypernetwork_shapes_and_init(d_t, d_s):
    torch.manual_seed(0)
    h = HyperNet(d_t, d_s, init_std=1e-5)
    w1, w2 = h.net[0].weight, h.net[2].weight
    assert w1.shape == (d_t, d_t) and w2.shape == (d_s, d_t)
    assert h.net[0].bias is None and h.net[2].bias is None
    assert h(torch.randn(3, d_t)).shape == (3, d_s)
    if d_t >= 64:
        assert w1.std().item() == pytest.approx(1e-5, rel=0.2)


def _plan(t_arch, s_arch, rate=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)

    def scores(arch):
        return {
            "ffn_layer": torch.randn(arch.n_layers, generator=g),
            "attn_layer": torch.randn(arch.n_layers, generator=g),
            "ffn": torch.randn(arch.n_layers, arch.intermediate_size, generator=g),
            "attn": torch.randn(arch.n_layers, arch.n_heads * arch.head_dim, generator=g),
        }

    return plan_transfer(scores(t_arch), scores(s_arch), t_arch, s_arch, rate)


def test_plan_pairs_top_teacher_layers_in_order_and_ranks_neurons(tiny_models):
    from pktransfer.models import load_model
    from pktransfer.recipe import ModelSpec

    t = load_model(ModelSpec(model=str(tiny_models["qwen2_teacher"])))
    s = load_model(ModelSpec(model=str(tiny_models["qwen2_student"])))
    plan = _plan(t.arch, s.arch)
    for fam in ("ffn", "attn"):
        layers = plan[fam]["teacher_layers"]
        assert len(layers) == s.arch.n_layers and layers == sorted(layers)
    assert plan["ffn"]["n"] == 16  # 0.25 of the student's 64 FFN neurons
    assert all(len(ix) == 16 for ix in plan["ffn"]["teacher"] + plan["ffn"]["student"])


def test_hooked_injection_equals_the_merged_weights_and_merge_adds_exactly_the_delta(tiny_models):
    from pktransfer.models import load_model
    from pktransfer.ops.location import extract
    from pktransfer.recipe import ModelSpec

    t = load_model(ModelSpec(model=str(tiny_models["qwen2_teacher"])))
    s = load_model(ModelSpec(model=str(tiny_models["qwen2_student"])))
    plan = _plan(t.arch, s.arch)
    vectors = extract(t, plan)
    assert vectors["up"][0].shape == (16, 64) and vectors["o"][0].shape == (8, 64)
    torch.manual_seed(1)
    hyper = {r: HyperNet(64, 32, init_std=0.05) for r in ("up", "down", "v", "o")}
    injection = Injection(s, plan)
    with torch.no_grad():
        deltas = mapped_deltas(hyper, vectors, injection, torch.device("cpu"))
    ids = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])
    original = {k: v.clone() for k, v in s.model.state_dict().items()}
    with torch.no_grad():
        plain = s.model(input_ids=ids).logits
        handles = injection.hooks(s.model, deltas)
        hooked = s.model(input_ids=ids).logits
        for h in handles:
            h.remove()
        saved = injection.merge(s.model, deltas)
        merged = s.model(input_ids=ids).logits
    assert not torch.allclose(plain, hooked, atol=1e-4)  # the injection changes the student
    assert torch.allclose(hooked, merged, atol=1e-5)
    after = s.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], original[k])}
    assert changed == {m + ".weight" for mods in injection.modules.values() for m in mods}
    for name in {m for mods in injection.modules.values() for m in mods}:
        w0 = original[name + ".weight"].clone()
        if f"{name}::rows" in saved:
            w0[saved[f"{name}::rows"]] += saved[f"{name}::values"]
        else:
            w0[:, saved[f"{name}::cols"]] += saved[f"{name}::values"].T
        assert torch.equal(w0, after[name + ".weight"]), name
    assert delta_penalty(deltas) > 0


def test_step_rule_and_batches():
    assert choose_step({0: 1.0, 1: 0.9, 2: 0.8, 3: 0.8}) == 2  # lowest, ties -> earlier; step 0 never
    assert choose_step({0: 0.1, 1: 0.9, 2: 1.0}) == 1
    ext, align = list(range(3)), list(range(100, 140))
    b = step_batch(4, ext, align, 15, seed=0, order="file")
    assert b[0] == 1 and len(b) == 16 and len(set(b[1:])) == 15 and set(b[1:]) <= set(align)
    assert step_batch(4, ext, align, 15, seed=0, order="file") == b and step_batch(4, ext, align, 15, seed=1, order="file") != b
    o = step_batch(4, ext, align, 15, seed=0)  # official: the extract item last, the draw a function of the step only
    assert o[-1] == 1 and len(set(o[:-1])) == 15 and o == step_batch(4, ext, align, 15, seed=1)


# ---- end to end ----------------------------------------------------------------------------------------


def _recipe(base: dict, **method):
    base = {**base, "task": {**base["task"], "params": {"sizes": {"test": 6, "train": 16, "seed": 4, "extract": 3, "align": 24}}}}
    return recipe_from_dict({**base, "method": {"name": "laten", "n_val": 6, "checkpoint": 2, **method}})


def test_laten_saves_a_merged_student_equal_to_the_original_plus_the_delta(tiny_recipe, tmp_path):

    res = pktransfer.run(_recipe(tiny_recipe, init_std=0.02, lr=1e-3, transfer_rate=0.2), quiet=True)
    out = res.output_dir
    info = res.run["method"]
    assert info["chosen_step"] == 3 and info["checkpoint_kept"] == 2 and set(info["val_loss"]) == {0, 1, 2, 3}
    assert res.run["outputs"]["adapter"] is None and not (out / "adapter").exists()
    assert res.run["training"]["steps"] == info["chosen_step"]
    from conftest import assert_merged_is_original_plus_delta

    assert_merged_is_original_plus_delta(out, tiny_recipe["student"]["model"], 4 * 2)  # up, down, v, o x 2 layers
    assert res.metrics["trained"]["test"]["n"] == 6
    history = json.loads((out / "checkpoints" / "log_history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2, 3]


def test_laten_resumes_from_its_last_step_and_reproduces_the_run(tiny_recipe, tmp_path):
    from pktransfer.data import PromptFormatter, get_task
    from pktransfer.methods import MethodContext, get_method
    from pktransfer.models import load_model
    from pktransfer.progress import Progress

    recipe = _recipe(tiny_recipe, init_std=0.02, lr=1e-3)
    runs, ctxs = [], []
    for attempt in range(2):
        student, teacher = load_model(recipe.student), load_model(recipe.teacher)
        task = get_task("arithmetic", recipe.task.params)
        ctx = MethodContext(
            recipe, student, task, PromptFormatter(student.tokenizer), tmp_path, Progress(quiet=True), lambda t=teacher: t
        )
        if attempt == 1:  # as if killed during step 3: its checkpoint is incomplete
            (tmp_path / "laten" / "steps" / "step-3" / "done").unlink()
        method = get_method(recipe.method)
        model = method.prepare(ctx)
        ctxs.append(ctx)
        runs.append((method, {k: v.clone() for k, v in model.state_dict().items()}))
    (m1, w1), (m2, w2) = runs
    assert m2.training["resumed_from"].endswith("step-2") and m2.report()["located_from"] == "reused"
    # the resumed run's cost is the whole run's: the location it reused and the first attempt's two updates
    earlier = m2.training["earlier_attempts"]
    assert earlier["step"] == 2 and earlier["attempts"] == 1 and earlier["cost_kept"] is True
    first = m1.training["log_history"]
    assert earlier["train_seconds"] == pytest.approx(m1.report()["locate_seconds"] + first[2]["seconds"], abs=0.05)
    assert "earlier_attempts" not in m1.training and [h.get("attempt") for h in m2.training["log_history"]] == [None, 1, 1, 2]
    assert ctxs[1].teacher_work.forward_tokens == ctxs[0].teacher_work.forward_tokens > 0
    assert [h["val_loss"] for h in m1.training["log_history"]] == pytest.approx(
        [h["val_loss"] for h in m2.training["log_history"]], rel=1e-6
    )
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-7), k


def test_laten_refuses_a_too_small_align_split(tiny_recipe):
    with pytest.raises(DataError, match="n_val"):
        pktransfer.run(_recipe(tiny_recipe, n_val=30), quiet=True)


# ---- as the official code does it ----------------------------------------------------------------------


def test_the_answer_token_skips_trailing_punctuation_and_spaces(tiny_models):
    from pktransfer.data import Item, PromptFormatter
    from pktransfer.methods.laten import answer_input, strip_answer
    from pktransfer.models import load_model
    from pktransfer.recipe import ModelSpec

    assert strip_answer("So the answer is 12.") == "So the answer is 12"
    assert strip_answer('return f(x)]\n, ."') == "return f(x"
    assert strip_answer("...") == ""
    tok = load_model(ModelSpec(model=str(tiny_models["qwen2_student"]))).tokenizer
    fmt = PromptFormatter(tok)
    inp = answer_input(fmt, Item(id="g", prompt="Q?", response="She makes 18 dollars. So the answer is 18.\n", reference="18"))
    assert tok.decode([inp.y]) == "8"  # the character tokenizer: the last digit, not "." or "\n"
    assert tok.decode(list(inp.ids)).replace(" ", "").endswith("answeris1")  # the prefix stops before y
    with pytest.raises(DataError, match="no answer token"):
        answer_input(fmt, Item(id="e", prompt="Q?", response=" .", reference=""))


def test_penalty_is_one_mse_per_module_type_over_all_its_layers():
    deltas = {"up": [torch.ones(2, 3), torch.zeros(1, 3)], "down": [torch.full((1, 3), 2.0)]}
    # up: 6 ones and 3 zeros -> 6/9; down: 4.0; a per-layer sum would give 1 + 0 + 4
    assert delta_penalty(deltas).item() == pytest.approx(6 / 9 + 4.0)


def test_learning_rates_follow_the_official_one_cycle(tiny_recipe):
    recipe = _recipe(tiny_recipe, init_std=0.02, lr=3e-4, choose="validation")
    res = pktransfer.run(recipe, quiet=True, evaluate=False)
    history = res.run["method"]["val_loss"], json.loads((res.output_dir / "checkpoints" / "log_history.json").read_text())
    lrs = [h["lr"] for h in history[1] if h["step"] > 0]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-4)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-4, total_steps=3, pct_start=0.1, final_div_factor=1, anneal_strategy="cos"
    )
    expected = []
    for _ in range(3):  # one update per extract item (3 here), the official total_steps
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert res.run["method"]["schedule"]["total_steps"] == 3 and res.run["training"]["steps"] == 3
    # the choice among the trained updates follows the held-out CE
    assert res.run["method"]["chosen_step"] == choose_step({int(k): v for k, v in history[0].items()})


def test_each_update_relocates_on_its_own_extract_item(tiny_recipe, tmp_path):
    from safetensors.torch import load_file

    from pktransfer.models import load_model
    from pktransfer.ops.location import mean_scores

    recipe = _recipe(tiny_recipe, init_std=0.02, transfer_rate=0.2)
    res = pktransfer.run(recipe, quiet=True, evaluate=False)
    info = res.run["method"]
    flat = load_file(str(res.output_dir / "laten" / "located.safetensors"))
    n = len({k.split(".")[1] for k in flat})  # 3 extract items + the final training item
    assert n == 4 and info["locate"] == "per_example" and info["inject_on"] == "train_sample"
    t_arch, s_arch = load_model(recipe.teacher).arch, load_model(recipe.student).arch

    def scores(side, i):
        return {k: flat[f"{side}.{i}.{k}"] for k in ("attn_layer", "ffn_layer", "attn", "ffn")}

    for step in range(3):
        plan = plan_transfer(scores("t", step), scores("s", step), t_arch, s_arch, 0.2)
        assert info["teacher_layers_per_step"][step] == {f: plan[f]["teacher_layers"] for f in ("ffn", "attn")}
    final = plan_transfer(scores("t", 3), scores("s", 3), t_arch, s_arch, 0.2)
    assert info["teacher_layers"] == {f: final[f]["teacher_layers"] for f in ("ffn", "attn")}
    # averaged: one plan from the mean over the extract items, for every update and the saved model
    recipe = _recipe(tiny_recipe, init_std=0.02, transfer_rate=0.2, locate="averaged", inject_on="extract_mean")
    recipe.output_dir = str(tmp_path / "averaged")
    info = pktransfer.run(recipe, quiet=True, evaluate=False).run["method"]
    mean = plan_transfer(
        mean_scores([scores("t", i) for i in range(3)]), mean_scores([scores("s", i) for i in range(3)]), t_arch, s_arch, 0.2
    )
    assert info["teacher_layers_per_step"] == [{f: mean[f]["teacher_layers"] for f in ("ffn", "attn")}] * 3


def test_a_bfloat16_student_keeps_the_delta_in_its_saved_model(tiny_recipe):
    from transformers import AutoModelForCausalLM

    tiny_recipe["student"]["dtype"] = "bfloat16"
    res = pktransfer.run(_recipe(tiny_recipe, init_std=1e-3, lr=1e-4), quiet=True, evaluate=False)
    merged = AutoModelForCausalLM.from_pretrained(res.output_dir / "merged")
    assert merged.dtype == torch.float32
    original = AutoModelForCausalLM.from_pretrained(tiny_recipe["student"]["model"], dtype=torch.bfloat16).float()
    delta = load_file(str(res.output_dir / "laten" / "delta.safetensors"))
    assert max(v.abs().max().item() for k, v in delta.items() if k.endswith("::values")) < 1e-2  # a small delta
    # the hooked injection: the original weights (bfloat16 values, computed in float32) + x·Δᵀ at the indices
    handles = []
    for key, values in delta.items():
        if not key.endswith("::values"):
            continue
        name = key.split("::")[0]
        rows = delta.get(f"{name}::rows")

        def hook(mod, args, out, values=values, rows=rows, cols=delta.get(f"{name}::cols")):
            x = args[0]
            if rows is not None:
                return out.index_add(-1, rows, x @ values.T)
            return out + x[..., cols] @ values

        handles.append(original.get_submodule(name).register_forward_hook(hook))
    ids = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])
    with torch.no_grad():
        hooked = original(input_ids=ids).logits
        for h in handles:
            h.remove()
        saved = merged(input_ids=ids).logits
        plain = original(input_ids=ids).logits
    assert torch.allclose(saved, hooked, atol=1e-5), (saved - hooked).abs().max()
    assert not torch.allclose(saved, plain, atol=1e-6)  # the transfer is in the saved model
    changed = sum(
        int((merged.get_submodule(k.split("::")[0]).weight != original.get_submodule(k.split("::")[0]).weight).sum())
        for k in delta
        if k.endswith("::values")
    )
    injected = sum(v.numel() for k, v in delta.items() if k.endswith("::values"))
    assert changed >= 0.99 * injected  # every injected entry carries its delta (not rounding noise)


@pytest.mark.parametrize("seed", range(6))
def test_the_injection_item_is_a_training_item_never_a_carved_validation_item(tiny_recipe, seed):
    """inject_on: train_sample draws one of the run's training items (official inference draws a training item);
    validation items carved from the end of the train split are never drawn, so tuning on them stays clean."""
    from types import SimpleNamespace

    from pktransfer.data import get_task, train_and_validation
    from pktransfer.methods import get_method

    tiny_recipe["method"] = {"name": "laten"}
    tiny_recipe["task"].update(n_train=6, validation=8)
    tiny_recipe["seed"] = seed
    recipe = recipe_from_dict(tiny_recipe)
    task = get_task(recipe.task.name, recipe.task.params)
    train, val = train_and_validation(task, 6, 8)
    item = get_method(recipe.method)._final_item(SimpleNamespace(task=task, recipe=recipe))
    assert item.id in {it.id for it in train} and item.id not in {it.id for it in val}


@pytest.mark.parametrize("attn_score", ["self_subvalue", "o_input"])
def test_the_recipes_attention_score_reaches_the_location(tiny_recipe, monkeypatch, attn_score):
    import pktransfer
    import pktransfer.methods.laten as laten

    seen = []
    real = laten.locate_scores

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_score"))
        return real(*args, **kwargs)

    monkeypatch.setattr(laten, "locate_scores", spy)
    pktransfer.run(_recipe(tiny_recipe, attn_score=attn_score), quiet=True, evaluate=False)
    assert seen == [attn_score, attn_score]  # teacher and student


# ---- the grid's location cache ----------------------------------------------------------------------------


def test_location_cache_reads_back_each_items_scores_to_the_bit_in_any_order(tiny_models, tmp_path):
    from pktransfer.data import PromptFormatter, get_task
    from pktransfer.methods.laten import LocationCache, answer_input
    from pktransfer.models import load_model
    from pktransfer.progress import Progress
    from pktransfer.recipe import ModelSpec

    spec = ModelSpec(model=str(tiny_models["qwen2_teacher"]))
    loaded = load_model(spec)
    task = get_task("arithmetic", {"sizes": {"extract": 4, "train": 1, "test": 1}})
    inputs = [answer_input(PromptFormatter(loaded.tokenizer), it) for it in task.split("extract")]
    where = {"locate_vocab": 16, "attn_score": "self_subvalue"}
    plain = LocationCache(None, Progress(quiet=True))
    alone, n = plain.scores(loaded, spec.identity(), where, inputs, "teacher")
    assert n == 4 and plain.computed == [True] * 4 and not list(tmp_path.iterdir())
    cache = LocationCache(tmp_path / "loc", Progress(quiet=True))
    first, n1 = cache.scores(loaded, spec.identity(), where, inputs[:2], "teacher")  # two items, stored
    assert n1 == 2 and len(list((tmp_path / "loc").iterdir())) == 2
    again, n2 = cache.scores(loaded, spec.identity(), where, inputs[::-1], "teacher")  # two read back, two computed
    assert n2 == 2 and cache.computed == [True, True, False, False]
    for got, want in [*zip(first, alone[:2], strict=True), *zip(again, alone[::-1], strict=True)]:
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # each item is stored as soon as it is located: a run stopped half-way keeps the items before the stop
    from pktransfer.ops.location import AnswerInput

    stopped = LocationCache(tmp_path / "stopped", Progress(quiet=True))
    with pytest.raises(Exception):  # noqa: B017 - the second input has no tokens: the model refuses it
        stopped.scores(loaded, spec.identity(), where, [inputs[0], AnswerInput((), 3)], "teacher")
    assert len(list((tmp_path / "stopped").iterdir())) == 1
    # other settings or another dtype are other entries, never a reuse
    _, n3 = cache.scores(loaded, spec.identity(), {**where, "locate_vocab": 8}, inputs[:1], "teacher")
    loaded.model.double()
    _, n4 = cache.scores(loaded, spec.identity(), where, inputs[:1], "teacher")
    assert n3 == 1 and n4 == 1 and len(list((tmp_path / "loc").iterdir())) == 6


def test_a_corrupt_location_cache_entry_is_located_again(tiny_models, tmp_path):
    from pktransfer.data import PromptFormatter, get_task
    from pktransfer.methods.laten import LocationCache, answer_input
    from pktransfer.models import load_model
    from pktransfer.progress import Progress
    from pktransfer.recipe import ModelSpec

    spec = ModelSpec(model=str(tiny_models["qwen2_student"]))
    loaded = load_model(spec)
    task = get_task("arithmetic", {"sizes": {"extract": 1, "train": 1, "test": 1}})
    inputs = [answer_input(PromptFormatter(loaded.tokenizer), task.split("extract")[0])]
    where = {"locate_vocab": None, "attn_score": "o_input"}
    cache = LocationCache(tmp_path, Progress(quiet=True))
    (want,), _ = cache.scores(loaded, spec.identity(), where, inputs, "student")
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(entry.read_bytes()[:100])  # a file cut short
    (got,), n = cache.scores(loaded, spec.identity(), where, inputs, "student")
    assert n == 1 and all(torch.equal(got[k], want[k]) for k in want)
    _, n_after = cache.scores(loaded, spec.identity(), where, inputs, "student")
    assert n_after == 0  # replaced by a whole entry


def test_seeds_sharing_a_location_cache_get_the_results_they_get_alone(tiny_recipe, tmp_path):
    """The grid's cells pass one cache folder: a second seed reads the extract items' location the first stored, and
    trains to the same numbers as without the cache (its own injection item is located anew)."""
    runs = {}
    for name, seed, cache in (("alone", 1, None), ("first", 0, tmp_path / "cache"), ("shared", 1, tmp_path / "cache")):
        r = _recipe({**tiny_recipe, "output_dir": str(tmp_path / name), "seed": seed}, init_std=0.02, lr=1e-3)
        runs[name] = pktransfer.run(r, quiet=True, evaluate=False, cache_dir=cache)
    info = runs["shared"].run["method"]
    n_ext = 3
    assert info["location_cache"]["items"] == n_ext + 1
    assert info["location_cache"]["teacher_from_cache"] == n_ext == info["location_cache"]["student_from_cache"]
    assert "location_cache" not in runs["alone"].run["method"]
    assert runs["first"].run["method"]["location_cache"]["teacher_from_cache"] == 0
    assert info["val_loss"] == runs["alone"].run["method"]["val_loss"]
    da = load_file(str(runs["alone"].output_dir / "laten" / "delta.safetensors"))
    db = load_file(str(runs["shared"].output_dir / "laten" / "delta.safetensors"))
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    # the teacher work read from the cache is counted where it was spent, in the first seed's run
    t_shared = runs["shared"].run["budget"]["teacher"]["forward_tokens"]
    t_alone = runs["alone"].run["budget"]["teacher"]["forward_tokens"]
    assert 0 < t_shared < t_alone
