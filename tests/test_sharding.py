"""A teacher sharded through accelerate (``teacher.device_map`` / ``max_memory`` / ``offload_folder``) computes
what the unsharded teacher computes: tested here on CPU with the teacher's layers split between CPU memory and
disk offload (its offloaded parameters sit on ``meta`` between forwards)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import pktransfer
from pktransfer.recipe import recipe_from_dict

# the tiny teacher has 4 layers: embeddings and layers 1 and 3 in CPU memory, layers 0 and 2, the final norm
# and lm_head offloaded to disk (Seeking selects layers 0 and 1 of this teacher: one of each kind)
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "disk",
    "lm_head": "disk",
}


def _recipe(tiny_recipe, tmp_path, method: dict, name: str, sharded: bool):
    tiny_recipe = {**tiny_recipe, "teacher": dict(tiny_recipe["teacher"])}
    if sharded:
        tiny_recipe["teacher"].update(device_map=SPLIT, offload_folder=str(tmp_path / f"offload-{name}"))
    tiny_recipe["method"] = method
    tiny_recipe["output_dir"] = str(tmp_path / name)
    tiny_recipe["evaluation"] = {**tiny_recipe["evaluation"], "teacher": False}
    tiny_recipe["task"]["params"]["sizes"].update(extract=3, align=24)
    tiny_recipe["training"]["max_length"] = 128
    return recipe_from_dict(tiny_recipe)


def test_the_split_really_offloads(tiny_models, tmp_path):
    from pktransfer.models import load_model
    from pktransfer.ops.offload import input_device, offload_hook, stored_value
    from pktransfer.recipe import ModelSpec

    spec = ModelSpec(model=str(tiny_models["qwen2_teacher"]), device_map=SPLIT, offload_folder=str(tmp_path / "off"))
    loaded = load_model(spec)
    q = loaded.model.get_submodule("model.layers.2.self_attn.q_proj")
    assert q.weight.device.type == "meta" and offload_hook(q) is not None
    assert stored_value(q).device.type == "cpu" and stored_value(q).shape == q.weight.shape
    assert input_device(loaded.model).type == "cpu" and loaded.device.type == "cpu"
    whole = load_model(ModelSpec(model=str(tiny_models["qwen2_teacher"])))
    assert torch.equal(stored_value(q), whole.model.get_submodule("model.layers.2.self_attn.q_proj").weight)


@pytest.mark.parametrize("structure", ["submatrix", "row_column"])
def test_sharded_sensitivity_equals_unsharded(tiny_recipe, tmp_path, structure):
    """Seeking's streamed sensitivity: every accumulator (maps, row/column sums, totals of every parameter,
    the offloaded ones and the vocabulary matrices included) matches the unsharded teacher's."""
    method = {"name": "seeking", "n_seed": 3, "structure": structure}
    runs = {}
    for sharded in (False, True):
        name = f"{structure}-{'sharded' if sharded else 'whole'}"
        out = pktransfer.extract(_recipe(tiny_recipe, tmp_path, dict(method), name, sharded), quiet=True).output_dir
        runs[sharded] = load_file(str(next((out / "sensitivity").glob("*.safetensors"))))
    whole, sharded = runs[False], runs[True]
    assert whole.keys() == sharded.keys()
    offloaded = [k for k in whole if k.startswith(("model.layers.0.", "model.layers.2.", "lm_head"))]
    assert offloaded and (structure != "submatrix" or any(k.endswith("::full") for k in offloaded))
    for key in whole:
        assert torch.allclose(whole[key].double(), sharded[key].double(), rtol=1e-5, atol=1e-7), key
    # offloaded weights were really counted (biases may be exactly 0: a key bias does not change attention)
    assert all(float(sharded[k].abs().sum()) > 0 for k in offloaded if ".weight::" in k)


@pytest.mark.parametrize(
    "method",
    [
        {"name": "seeking", "n_seed": 3},
        {"name": "kd"},
        {"name": "semalign", "critical_layers": "all"},
        {"name": "laten", "n_val": 6, "checkpoint": 2, "init_std": 0.02, "lr": 1e-3, "transfer_rate": 0.2},
    ],
    ids=["seeking", "kd", "semalign", "laten"],
)
def test_every_teacher_side_method_gives_the_same_student_with_a_sharded_teacher(tiny_recipe, tmp_path, method):
    """Seeking's sensitivity and teacher weights, KD's logits, SemAlign's attribution and targets, LaTen's
    location and teacher neurons: the trained student is the same with the teacher sharded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outs = {}
    for sharded in (False, True):
        name = f"{method['name']}-{'sharded' if sharded else 'whole'}"
        outs[sharded] = pktransfer.run(_recipe(tiny_recipe, tmp_path, dict(method), name, sharded), quiet=True)
    a, b = outs[False], outs[True]
    assert a.metrics["trained"]["test"]["accuracy"] == b.metrics["trained"]["test"]["accuracy"]
    ids = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])
    with torch.no_grad():
        logits = []
        for res in (a, b):
            if (res.output_dir / "merged").is_dir():
                model = AutoModelForCausalLM.from_pretrained(str(res.output_dir / "merged"))
            else:
                base = AutoModelForCausalLM.from_pretrained(tiny_recipe["student"]["model"])
                model = PeftModel.from_pretrained(base, str(res.output_dir / "adapter"))
            logits.append(model(input_ids=ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


def test_auto_map_with_a_memory_cap_offloads_and_matches(tiny_models, tmp_path):
    """device_map 'auto' with a CPU cap smaller than the model puts the overflow on disk; logits unchanged."""
    from pktransfer.models import load_model
    from pktransfer.recipe import ModelSpec

    folder = str(tiny_models["qwen2_teacher"])
    spec = ModelSpec(model=folder, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "off"))
    sharded = load_model(spec)
    assert "disk" in set(sharded.model.hf_device_map.values())
    whole = load_model(ModelSpec(model=folder))
    ids = torch.tensor([[5, 17, 30, 44]])
    with torch.no_grad():
        assert torch.allclose(sharded.model(input_ids=ids).logits, whole.model(input_ids=ids).logits, atol=1e-5)


def test_sharding_settings_are_checked(tiny_recipe):
    from pktransfer.errors import RecipeError

    bad = {**tiny_recipe, "teacher": {**tiny_recipe["teacher"], "max_memory": {"cpu": "1GiB"}}}
    with pytest.raises(RecipeError, match="set device_map too"):
        recipe_from_dict(bad)
    bad = {**tiny_recipe, "student": {**tiny_recipe["student"], "device_map": "auto"}}
    with pytest.raises(RecipeError, match="student trains whole on one device"):
        recipe_from_dict(bad)
