"""Seeking on tiny random teacher/student pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pktransfer
from pktransfer.data import PromptFormatter, get_task
from pktransfer.errors import DataError, IncompatiblePairError, RecipeError
from pktransfer.methods import MethodContext, get_method
from pktransfer.methods.seeking import load_sensitivity
from pktransfer.models import load_model
from pktransfer.progress import Progress
from pktransfer.recipe import recipe_from_dict

sys.path.insert(0, "tests")
from conftest import save_tiny

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def _seeking(tiny_recipe, **method):
    tiny_recipe["method"] = {"name": "seeking", "n_seed": 3, **method}
    tiny_recipe["lora"]["target_modules"] = ALL_TARGETS
    return recipe_from_dict(tiny_recipe)


def _prepare(recipe, workdir: Path):
    student = load_model(recipe.student)
    original = {k: v.clone() for k, v in student.model.state_dict().items()}
    task = pktransfer.data.get_task(recipe.task.name, recipe.task.params)
    teacher_holder = {}

    def load_teacher():
        if "t" not in teacher_holder:
            teacher_holder["t"] = load_model(recipe.teacher)
        return teacher_holder["t"]

    method = get_method(recipe.method)
    ctx = MethodContext(recipe, student, task, PromptFormatter(student.tokenizer), workdir, Progress(quiet=True), load_teacher)
    pktransfer.pipeline.seed_everything(recipe.seed)
    return method, method.prepare(ctx), student, original


IDS = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])


@pytest.mark.parametrize("structure", ["submatrix", "row_column", "neuron", "random", "uniform"])
def test_step0_logits_equal_the_original_student(tiny_recipe, tiny_models, tmp_path, structure):
    from transformers import AutoModelForCausalLM

    recipe = _seeking(tiny_recipe, structure=structure)
    _, model, _, _ = _prepare(recipe, tmp_path)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_student"]))(input_ids=IDS).logits
        got = model(input_ids=IDS).logits
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    # the LoRA really starts at the teacher's subspace, not at zero
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().sum() > 0


def test_sensitivity_layer_selection_and_artifacts(tiny_recipe, tmp_path):
    recipe = _seeking(tiny_recipe)
    _prepare(recipe, tmp_path)
    info = json.loads((tmp_path / "seeking.json").read_text())
    scores = info["layer_scores"]
    assert len(scores) == 4 and all(s > 0 for s in scores)
    top2 = sorted(sorted(range(4), key=lambda i: -scores[i])[:2])
    assert info["selected_layers"] == top2
    sens = load_sensitivity(tmp_path / "sensitivity")
    assert sens.n_samples == 3
    # maps of unselected layers were dropped, selected ones kept for the submatrix search
    for i in range(4):
        p = sens.params[f"model.layers.{i}.mlp.up_proj.weight"]
        assert (p.full is not None) == (i in top2)
    assert sens.params["model.embed_tokens.weight"].full is None  # hidden axis only: column sums


def test_sensitivity_reuse_skips_the_teacher_backward(tiny_recipe, tmp_path, monkeypatch):
    recipe = _seeking(tiny_recipe)
    _prepare(recipe, tmp_path / "a")
    import pktransfer.methods.seeking as seeking

    monkeypatch.setattr(seeking, "compute_sensitivity", lambda *a, **k: pytest.fail("recomputed"))
    recipe2 = _seeking(tiny_recipe, sensitivity=str(tmp_path / "a" / "sensitivity"))
    _, _model, _, _ = _prepare(recipe2, tmp_path / "b")
    assert (
        json.loads((tmp_path / "b" / "seeking.json").read_text())["selected_layers"]
        == json.loads((tmp_path / "a" / "seeking.json").read_text())["selected_layers"]
    )


def test_run_end_to_end_and_adapter_loads_on_the_unmodified_student(tiny_recipe, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = _seeking(tiny_recipe, layers="last")
    recipe.training.save_merged = True
    res = pktransfer.run(recipe, quiet=True)
    out = res.output_dir
    assert set(res.metrics) == {"teacher", "student", "trained"}
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * recipe.lora.r and cfg["lora_alpha"] == 2 * recipe.lora.alpha
    assert any("lora_embedding_A" in k for k in load_file(str(out / "adapter" / "adapter_model.safetensors")))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))(input_ids=IDS).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_student"]))
        plain = base(input_ids=IDS).logits
        adapted = PeftModel.from_pretrained(base, str(out / "adapter"))(input_ids=IDS).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert not torch.allclose(plain, adapted, atol=1e-4)
    assert json.loads((out / "seeking.json").read_text())["selected_layers"] == [2, 3]


def test_same_seed_same_seeking_adapter(tiny_recipe, tmp_path):
    recipe = _seeking(tiny_recipe, structure="random")
    for name in ("a", "b"):
        recipe.output_dir = str(tmp_path / name)
        pktransfer.run(recipe, quiet=True, evaluate=False)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_llama_pair_and_gqa_growth(tiny_models, tiny_recipe, tmp_path):
    tiny_recipe["teacher"]["model"] = str(tiny_models["llama_teacher"])
    tiny_recipe["student"]["model"] = str(tiny_models["llama_student"])
    _prepare(_seeking(tiny_recipe, structure="row_column"), tmp_path / "ok")
    # a student with more kv heads (4 x 8 = 32 rows) than the teacher (1 x 16 = 16 rows) on k/v
    grow_t = save_tiny(tmp_path, "t_kv1", "llama", seed=7, hidden=64, layers=4, heads=4, kv_heads=1, ffn=128)
    grow_s = save_tiny(tmp_path, "s_kv4", "llama", seed=8, hidden=32, layers=2, heads=4, kv_heads=4, ffn=64)
    tiny_recipe["teacher"]["model"], tiny_recipe["student"]["model"] = str(grow_t), str(grow_s)
    with pytest.raises(IncompatiblePairError, match=r"k_proj has 32 rows but the teacher's .* only 16"):
        _prepare(_seeking(tiny_recipe), tmp_path / "grow")
    _, model, _, _ = _prepare(_seeking(tiny_recipe, grow="pad"), tmp_path / "pad")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(grow_s))(input_ids=IDS).logits
        assert torch.allclose(ref, model(input_ids=IDS).logits, atol=1e-4)


def test_bad_pairs_and_inputs(tiny_models, tiny_recipe, tmp_path):
    mixed = dict(tiny_recipe, teacher={"model": str(tiny_models["llama_teacher"]), "device": "cpu"})
    with pytest.raises(IncompatiblePairError, match="llama model and student a qwen2"):
        _prepare(_seeking(mixed), tmp_path / "1")
    swapped = dict(tiny_recipe, teacher=tiny_recipe["student"], student=tiny_recipe["teacher"])
    with pytest.raises(IncompatiblePairError, match="larger than the teacher"):
        _prepare(_seeking(swapped), tmp_path / "2")
    other_vocab = save_tiny(tmp_path, "v", "qwen2", seed=9, hidden=64, layers=4, heads=4, kv_heads=2, ffn=128)
    cfg = json.loads((other_vocab / "config.json").read_text())
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg_obj = Qwen2Config(**{**cfg, "vocab_size": 120})
    AutoModelForCausalLM.from_config(cfg_obj).save_pretrained(other_vocab)
    vocab = dict(tiny_recipe, teacher={"model": str(other_vocab), "device": "cpu"})
    with pytest.raises(IncompatiblePairError, match="different vocabularies"):
        _prepare(_seeking(vocab), tmp_path / "3")
    big_rank = dict(tiny_recipe, lora={"r": 40, "alpha": 8})
    with pytest.raises(RecipeError, match="exceeds the smaller dimension"):
        _prepare(_seeking(big_rank), tmp_path / "4")
    short = dict(tiny_recipe, training={**tiny_recipe["training"], "max_length": 8})
    with pytest.raises(DataError, match="seed split"):
        _prepare(_seeking(short), tmp_path / "5")


def test_empty_seed_split_is_a_clear_error(tiny_recipe, tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps({"prompt": "1+1?", "response": "2"}) + "\n")
    empty = tmp_path / "seed.jsonl"
    empty.write_text("")
    tiny_recipe["task"] = {"name": "jsonl", "params": {"train": str(jsonl), "test": str(jsonl), "seed": str(empty)}}
    with pytest.raises(DataError, match="split 'seed' is empty"):
        _prepare(_seeking(tiny_recipe), tmp_path / "x")


def test_arithmetic_seed_split_feeds_the_sensitivity():
    assert len(get_task("arithmetic").split("seed")) == 32


def test_extract_then_inject_reusing_the_sensitivity(tiny_recipe, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from pktransfer.cli import app

    recipe = _seeking(tiny_recipe)
    recipe.output_dir = str(tmp_path / "ext")
    res = pktransfer.extract(recipe, quiet=True)
    summary = json.loads((res.output_dir / "sensitivity" / "summary.json").read_text())
    assert len(summary["layers"]) == 4 and summary["selected_layers"] == res.run["selected_layers"]
    assert {"self_attn.q_proj", "mlp.down_proj"} <= set(summary["layers"][0]["modules"])
    recipe.method.sensitivity = str(res.output_dir / "sensitivity")
    recipe.output_dir = str(tmp_path / "inj")
    inj = pktransfer.inject(recipe, quiet=True)
    assert inj.run["step0_max_logit_diff"] < 1e-4
    with torch.no_grad():
        residual = AutoModelForCausalLM.from_pretrained(str(inj.output_dir / "residual"))
        restored = PeftModel.from_pretrained(residual, str(inj.output_dir / "adapter_init"))(input_ids=IDS).logits
        original = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_student"]))(input_ids=IDS).logits
    assert torch.allclose(restored, original, atol=1e-4)
    # the CLI refuses a non-seeking recipe before creating any folder
    import yaml

    tiny_recipe["method"] = {"name": "lora"}
    tiny_recipe["output_dir"] = str(tmp_path / "nope")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    out = CliRunner().invoke(app, ["extract", str(tmp_path / "r.yaml"), "-q"])
    assert out.exit_code == 2 and "['seeking']" in out.output and not (tmp_path / "nope.partial").exists()


def test_interrupted_seeking_run_resumes_to_the_same_adapter(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.methods.seeking as seeking
    import pktransfer.pipeline as pipeline

    recipe = _seeking(tiny_recipe)
    recipe.output_dir = str(tmp_path / "full")
    pktransfer.run(recipe, quiet=True, evaluate=False)

    real_train = pipeline.train

    def crash_after_training(*a, **kw):
        real_train(*a, **kw)
        raise RuntimeError("killed after training")

    recipe.output_dir = str(tmp_path / "cut")
    monkeypatch.setattr(pipeline, "train", crash_after_training)
    with pytest.raises(RuntimeError, match="killed"):
        pktransfer.run(recipe, quiet=True, evaluate=False)
    monkeypatch.setattr(pipeline, "train", real_train)
    # the resumed run must rebuild the same residual from its saved sensitivity, not recompute it
    monkeypatch.setattr(seeking, "compute_sensitivity", lambda *a, **k: pytest.fail("sensitivity recomputed"))
    res = pktransfer.run(recipe, quiet=True, evaluate=False)
    assert res.run["training"]["resumed_from"] is not None
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_reused_sensitivity_without_the_needed_map_is_a_clear_error(tiny_recipe, tmp_path):
    recipe = _seeking(tiny_recipe, layers="last")
    _prepare(recipe, tmp_path / "a")  # keeps maps of layers 2, 3 only
    again = _seeking(tiny_recipe, layers="top", sensitivity=str(tmp_path / "a" / "sensitivity"))
    with pytest.raises(DataError, match="no per-element map"):
        _prepare(again, tmp_path / "b")
    ok = _seeking(tiny_recipe, layers="top", structure="row_column", sensitivity=str(tmp_path / "a" / "sensitivity"))
    _prepare(ok, tmp_path / "c")
    with pytest.raises(RecipeError, match=r"method\.layers"):
        _prepare(_seeking(tiny_recipe, layers=[0, 9]), tmp_path / "d")


def test_gradient_checkpointing_recomputes_and_gives_the_same_sensitivity(tiny_models):
    from transformers import AutoModelForCausalLM

    from pktransfer.methods.seeking import accumulator_modes, vocab_modules
    from pktransfer.models import describe
    from pktransfer.ops.sensitivity import sensitivity_over

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_teacher"]))
    arch = describe(model)
    calls = {"n": 0}
    mlp = model.model.layers[0].mlp
    forward = mlp.forward

    def counting_forward(*a, **k):  # counts recomputation too (torch skips module hooks when recomputing)
        calls["n"] += 1
        return forward(*a, **k)

    mlp.forward = counting_forward
    batch = [{"input_ids": torch.tensor([[5, 9, 30, 41]]), "labels": torch.tensor([[-100, 9, 30, 41]])}]
    modes = accumulator_modes(arch, "submatrix", {"q", "k", "v", "o", "gate", "up", "down"})
    plain = sensitivity_over(model, batch, modes, vocab_modules=vocab_modules(arch))
    assert calls["n"] == 1
    ckpt = sensitivity_over(model, batch, modes, vocab_modules=vocab_modules(arch), checkpointing=True)
    assert calls["n"] == 3  # the layer ran again in the backward: activations were not kept
    assert not model.is_gradient_checkpointing and not model.training
    for name, p in plain.params.items():
        assert float(ckpt.params[name].total) == pytest.approx(float(p.total), rel=1e-5), name


def test_the_recorded_step0_check_is_not_blurred_by_lora_dropout(tiny_recipe, tmp_path):
    tiny_recipe["lora"]["dropout"] = 0.05  # the default: new dropout modules start in training mode
    recipe = _seeking(tiny_recipe)
    recipe.output_dir = str(tmp_path / "inj")
    assert pktransfer.inject(recipe, quiet=True).run["step0_max_logit_diff"] < 1e-4


@pytest.mark.parametrize("layers", ["sensitivity", "last"])
def test_maps_of_the_selected_layers_only_give_the_same_sensitivity_and_start(tiny_recipe, tmp_path, monkeypatch, layers):
    """maps: selected_layers (default) keeps per-element maps only for the layers selection picks (two passes when the
    scores pick them, one when the strategy does not read them) and gives the same layer scores, maps and adapter
    start as the official one pass with a map for every layer; no pass holds a map of an unselected layer."""
    import pktransfer.methods.seeking as seeking
    from pktransfer.ops import sensitivity as sensitivity_ops

    held: list[set[str]] = []
    real = sensitivity_ops.StreamingSensitivity.__exit__

    def spy(self, *exc):
        held.append({n for n, p in self.params.items() if p.full is not None})
        return real(self, *exc)

    monkeypatch.setattr(sensitivity_ops.StreamingSensitivity, "__exit__", spy)
    starts, sens = {}, {}
    for maps in ("all_layers", "selected_layers"):
        held.clear()
        recipe = _seeking(tiny_recipe, maps=maps, layers=layers)
        method, _model, _, _ = _prepare(recipe, tmp_path / maps)
        starts[maps] = {k: v.clone() for k, v in method.initial_lora.items()}
        sens[maps] = load_sensitivity(tmp_path / maps / "sensitivity")
        selected = json.loads((tmp_path / maps / "seeking.json").read_text())["selected_layers"]
        kept = {int(n.split(".")[2]) for h in held for n in h if n.startswith("model.layers.")}
        if maps == "all_layers":
            assert len(held) == 1 and kept == {0, 1, 2, 3}
        else:
            assert len(held) == (2 if layers == "sensitivity" else 1) and kept == set(selected)
    assert starts["all_layers"].keys() == starts["selected_layers"].keys()
    for k in starts["all_layers"]:
        assert torch.equal(starts["all_layers"][k], starts["selected_layers"][k]), k
    a, b = sens["all_layers"], sens["selected_layers"]
    for name, p in a.params.items():
        assert torch.equal(p.total, b.params[name].total), name
        if p.full is not None:
            assert torch.equal(p.full, b.params[name].full), name
    assert seeking  # the module under test
