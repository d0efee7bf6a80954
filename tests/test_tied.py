"""Tied input/output embeddings: Seeking and weight selection on tied and untied pairs keep the student's
function at step 0 (checked by loading the saved folders with plain transformers + peft), for every
structure and target set the paper uses, and a trained run's adapter and merged model agree."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STUDENT_SHAPE, TEACHER_SHAPE, save_tiny

import pktransfer
from pktransfer.recipe import recipe_from_dict

FAMILIES = ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text", "olmo2", "phi3")
PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
IDS = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied_pairs")
    out = {}
    for family in FAMILIES:
        for tied in (True, False):
            key = f"{family}-{'tied' if tied else 'untied'}"
            out[key] = (
                save_tiny(root, f"{key}-t", family, seed=11, tied=tied, **TEACHER_SHAPE),
                save_tiny(root, f"{key}-s", family, seed=12, tied=tied, **STUDENT_SHAPE),
            )
    return out


def _recipe(tiny_recipe, pair, tmp_path, method: dict, targets=PAPER_TARGETS, name="out"):
    teacher, student = pair
    tiny_recipe["teacher"]["model"], tiny_recipe["student"]["model"] = str(teacher), str(student)
    tiny_recipe["method"] = method
    tiny_recipe["lora"]["target_modules"] = list(targets)
    tiny_recipe["output_dir"] = str(tmp_path / name)
    return recipe_from_dict(tiny_recipe)


def _inject(recipe, tmp_path):
    """pkt inject for Seeking; the same two folders for weight selection (prepare, then save like inject)."""
    if recipe.method.name == "seeking":
        return pktransfer.inject(recipe, quiet=True).output_dir
    from pktransfer.data import PromptFormatter, get_task
    from pktransfer.methods import MethodContext, get_method
    from pktransfer.models import load_model
    from pktransfer.models.tying import untie_if_targeted
    from pktransfer.progress import Progress

    student, teacher = load_model(recipe.student), load_model(recipe.teacher)
    untie_if_targeted(student, recipe.lora.target_modules)
    task = get_task(recipe.task.name, recipe.task.params)
    out = tmp_path / recipe.method.name
    out.mkdir(exist_ok=True)
    ctx = MethodContext(recipe, student, task, PromptFormatter(student.tokenizer), out, Progress(quiet=True), lambda: teacher)
    model = get_method(recipe.method).prepare(ctx)
    model.save_pretrained(str(out / "adapter_init"))
    model.unload().save_pretrained(str(out / "residual"))
    return out


def _restored_logits(out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        residual = AutoModelForCausalLM.from_pretrained(str(out / "residual"))
        return PeftModel.from_pretrained(residual, str(out / "adapter_init"))(input_ids=IDS).logits, residual


def _original_logits(folder):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(folder))(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["seeking", "weight_selection"])
@pytest.mark.parametrize(
    "pair_key",
    [f"{family}-{kind}" for family in FAMILIES for kind in ("tied", "untied")],
)
def test_step0_identity_tied_and_untied_every_family(tiny_recipe, pairs, tmp_path, pair_key, method):
    spec = {"name": "seeking", "n_seed": 3} if method == "seeking" else {"name": "weight_selection"}
    recipe = _recipe(tiny_recipe, pairs[pair_key], tmp_path, spec)
    out = _inject(recipe, tmp_path)
    restored, residual = _restored_logits(out)
    assert torch.allclose(restored, _original_logits(pairs[pair_key][1]), atol=1e-4), pair_key
    # the residual really holds W − s·BA on the vocabulary matrices (the teacher's start is not zero)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(pairs[pair_key][1]))
    assert not torch.equal(residual.get_output_embeddings().weight, original.get_output_embeddings().weight)
    assert not torch.equal(residual.get_input_embeddings().weight, original.get_input_embeddings().weight)
    if pair_key.endswith("-tied"):
        assert residual.config.tie_word_embeddings is False  # untied before injection, and saved that way


@pytest.mark.parametrize("structure", ["submatrix", "row_column", "neuron", "random", "uniform"])
def test_step0_identity_every_structure_on_a_tied_pair(tiny_recipe, pairs, tmp_path, structure):
    recipe = _recipe(tiny_recipe, pairs["qwen2-tied"], tmp_path, {"name": "seeking", "n_seed": 3, "structure": structure})
    restored, _ = _restored_logits(_inject(recipe, tmp_path))
    assert torch.allclose(restored, _original_logits(pairs["qwen2-tied"][1]), atol=1e-4)


@pytest.mark.parametrize(
    "targets",
    [
        ["embed_tokens"],
        ["lm_head"],
        ["embed_tokens", "lm_head"],
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        ["gate_proj", "up_proj", "down_proj"],
    ],
)
@pytest.mark.parametrize("method", ["seeking", "weight_selection"])
def test_step0_identity_every_target_set_on_a_tied_pair(tiny_recipe, pairs, tmp_path, targets, method):
    spec = {"name": "seeking", "n_seed": 3} if method == "seeking" else {"name": "weight_selection"}
    recipe = _recipe(tiny_recipe, pairs["llama-tied"], tmp_path, spec, targets=targets)
    restored, _ = _restored_logits(_inject(recipe, tmp_path))
    assert torch.allclose(restored, _original_logits(pairs["llama-tied"][1]), atol=1e-4)


def test_tied_run_adapter_on_the_original_student_equals_the_merged_model(tiny_recipe, pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tiny_recipe, pairs["qwen2-tied"], tmp_path, {"name": "seeking", "n_seed": 3})
    recipe.training.save_merged = True
    recipe.evaluation.teacher = False
    out = pktransfer.run(recipe, quiet=True).output_dir
    with torch.no_grad():
        merged_model = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
        merged = merged_model(input_ids=IDS).logits
        base = AutoModelForCausalLM.from_pretrained(str(pairs["qwen2-tied"][1]))  # tied, unmodified
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
        adapted = PeftModel.from_pretrained(base, str(out / "adapter"))(input_ids=IDS).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert merged_model.config.tie_word_embeddings is False
    assert not torch.equal(merged_model.get_output_embeddings().weight, merged_model.get_input_embeddings().weight)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"])
