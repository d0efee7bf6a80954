"""Generation through vLLM (``evaluation.backend``). The first tests run everywhere (the choice of backend and the
errors where vLLM is missing); the ones marked ``vllm`` need vLLM installed (skipped otherwise) and compare its
greedy outputs with transformers' on the offline student: run them in the vLLM environment of docs/evaluation.md,
"vLLM" (`pytest -m vllm tests/test_vllm.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pktransfer
from pktransfer.config import ModelSpec
from pktransfer.errors import PktError
from pktransfer.evaluation import vllm_backend
from pktransfer.recipe import recipe_from_dict


def test_auto_takes_vllm_on_cuda_only_and_hf_is_always_hf(monkeypatch):
    monkeypatch.setattr(vllm_backend, "available", lambda: True)
    assert vllm_backend.resolve("auto", "cuda") == "vllm"
    assert vllm_backend.resolve("auto", "cpu") == "hf"  # measured no faster on the CPU (docs/results.md)
    assert vllm_backend.resolve("hf", "cuda") == "hf"
    assert vllm_backend.resolve("vllm", "cpu") == "vllm"
    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    assert vllm_backend.resolve("auto", "cuda") == "hf"


def test_asking_for_vllm_where_it_is_missing_fails_before_any_model_loads(tiny_recipe, monkeypatch):
    import pktransfer.models as models

    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    tiny_recipe["evaluation"]["backend"] = "vllm"
    with pytest.raises(PktError, match="vLLM is not installed here") as err:
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    assert "evaluation.backend: hf" in err.value.hint
    assert not Path(tiny_recipe["output_dir"]).exists() and not Path(tiny_recipe["output_dir"] + ".partial").exists()
    with pytest.raises(PktError, match="vLLM is not installed here"):
        pktransfer.evaluate(tiny_recipe["student"]["model"], "arithmetic", backend="vllm", limit=2)


def test_an_hf_evaluation_records_no_vllm_backend(tiny_recipe):
    tiny_recipe["evaluation"]["backend"] = "hf"
    res = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    summary = json.loads((res.output_dir / "eval" / "trained.arithmetic.test.summary.json").read_text())
    assert "backend" not in summary["protocol"] and not (res.output_dir / "merged").exists()


needs_vllm = pytest.mark.skipif(not vllm_backend.available(), reason="vLLM is not installed here")


def _outputs(folder: Path) -> list[dict]:
    (items,) = folder.glob("*.items.jsonl")
    return [json.loads(line) for line in items.read_text().splitlines()]


@pytest.mark.vllm
@pytest.mark.integration
@needs_vllm
def test_vllm_greedy_matches_transformers_on_the_offline_student(tmp_path):
    """Greedy decoding of the same token ids: at least 95% identical outputs (kernels differ in the last bits, so a
    near tie may break the other way), the same verdicts wherever the outputs are the same."""
    out = {}
    for backend in ("hf", "vllm"):
        pktransfer.evaluate(
            ModelSpec(model="builtin:qwen2.5-coder-0.5b-instruct", dtype="bfloat16"), "arithmetic", backend=backend,
            limit=60, output_dir=str(tmp_path / backend), quiet=True,
        )  # fmt: skip
        out[backend] = _outputs(tmp_path / backend)
    pairs = list(zip(out["hf"], out["vllm"], strict=True))
    assert all(a["model_input"] == b["model_input"] for a, b in pairs)
    same = [a["output"] == b["output"] for a, b in pairs]
    assert sum(same) >= 0.95 * len(pairs), [(a["output"], b["output"]) for a, b in pairs if a["output"] != b["output"]]
    assert all(a["correct"] == b["correct"] for (a, b), s in zip(pairs, same, strict=True) if s)


@pytest.mark.vllm
@pytest.mark.integration
@needs_vllm
def test_a_trained_student_is_scored_by_vllm_from_its_merged_copy(tmp_path):
    """Two LoRA steps on the offline student (vLLM's CPU attention has no kernel for the tiny models' head size):
    the trained student is generated from merged/, and the verdicts equal those of hf on the same merged weights."""
    recipe = {
        "teacher": {"model": "builtin:qwen2.5-coder-1.5b-instruct"},  # not loaded: LoRA needs no teacher
        "student": {"model": "builtin:qwen2.5-coder-0.5b-instruct", "dtype": "bfloat16"},
        "task": {"name": "arithmetic", "n_train": 16, "n_test": 12},
        "method": {"name": "lora"},
        "training": {"max_steps": 2, "batch_size": 8, "lr": 1e-4, "max_length": 96},
        "evaluation": {"teacher": False, "student": False, "backend": "vllm"},
        "output_dir": str(tmp_path / "run"),
    }
    res = pktransfer.run(recipe_from_dict(recipe), quiet=True)
    summary = json.loads((res.output_dir / "eval" / "trained.arithmetic.test.summary.json").read_text())
    assert summary["protocol"]["backend"] == "vllm" and (res.output_dir / "merged" / "config.json").is_file()
    pktransfer.evaluate(
        ModelSpec(model=str(res.output_dir / "merged"), dtype="bfloat16"), "arithmetic", backend="hf",
        limit=12, output_dir=str(tmp_path / "hf"), quiet=True,
    )  # fmt: skip
    vllm_items = [json.loads(line) for line in (res.output_dir / "eval" / "trained.arithmetic.test.items.jsonl").open()]
    hf_items = _outputs(tmp_path / "hf")
    assert [a["model_input"] for a in vllm_items] == [b["model_input"] for b in hf_items]
    same = sum(a["output"] == b["output"] for a, b in zip(vllm_items, hf_items, strict=True))
    assert same >= 0.9 * len(hf_items)


def test_gkd_sampler_vllm_where_it_is_missing_fails_before_any_model_loads(tiny_recipe, monkeypatch):
    import pktransfer.models as models

    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    tiny_recipe["method"] = {"name": "gkd", "sampler": "vllm"}
    with pytest.raises(PktError, match=r"method\.sampler is vllm, but vLLM is not installed here") as err:
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    assert "method.sampler: hf" in err.value.hint
    tiny_recipe["method"] = {"name": "compose", "start": {"name": "lora"}, "objective": {"name": "gkd", "sampler": "vllm"}}
    with pytest.raises(PktError, match=r"objective\.sampler is vllm"):
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    assert not Path(tiny_recipe["output_dir"]).exists() and not Path(tiny_recipe["output_dir"] + ".partial").exists()


def test_gkd_samples_with_hf_on_the_cpu_and_says_so(tiny_recipe):
    tiny_recipe["method"] = {"name": "gkd", "lmbda": 1.0}
    tiny_recipe["training"]["max_steps"] = 2
    res = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    assert res.run["method"]["sampler"] == "hf" and res.run["method"]["student_sampled_batches"] == 2


def _lora_student(r: int = 8):
    from peft import get_peft_model

    from pktransfer.models import load_model
    from pktransfer.recipe import LoraSpec
    from pktransfer.training import lora_config

    student = load_model(ModelSpec(model="builtin:qwen2.5-coder-0.5b-instruct", dtype="bfloat16", device="cpu"))
    spec = LoraSpec(r=r, alpha=2 * r, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    return student, get_peft_model(student.model, lora_config(spec, student.arch))


def _hf_greedy(model, prompts, stop, n_new):
    import torch

    from pktransfer.methods.gkd import completion_tokens

    out = []
    with torch.no_grad():
        for p in prompts:  # one at a time: no padding in the comparison
            ids = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n_new, eos_token_id=stop,
                                 pad_token_id=stop[0])  # fmt: skip
            out.append(completion_tokens(ids[0, len(p) :].tolist(), set(stop)))
    return out


@pytest.mark.vllm
@pytest.mark.integration
@needs_vllm
def test_gkd_vllm_samples_come_from_the_students_current_weights(tmp_path):
    """The sampler is handed the student's current LoRA before every call: greedy samples agree with hf's on the same
    weights (to rounding), change when the LoRA changes, and come back when it is restored."""
    import torch

    from pktransfer.data import get_task, recipe_formatter
    from pktransfer.methods.gkd import completion_tokens

    student, model = _lora_student()
    task = get_task("arithmetic", {}, None)
    fmt = recipe_formatter(student.tokenizer, task, recipe_from_dict({}).task, "gkd")
    prompts = [fmt.encode_prompt(it.prompt) for it in task.split("test")[:12]]
    stop = fmt.stop_token_ids()
    sampler = vllm_backend.LoraSampler(model, student.tokenizer, tmp_path / "s", "bfloat16", 256, seed=0)

    def vllm_greedy():
        out = sampler.sample(prompts, temperature=0.0, max_new_tokens=12, stop_token_ids=stop)
        return [completion_tokens(c, set(stop)) for c in out]

    try:
        start = vllm_greedy()
        same = sum(a == b for a, b in zip(start, _hf_greedy(model, prompts, stop, 12), strict=True))
        assert same >= 0.9 * len(prompts), (start, same)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        saved = [p.detach().clone() for p in lora_b]
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in lora_b:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        moved = vllm_greedy()
        assert sum(a != b for a, b in zip(moved, start, strict=True)) >= len(prompts) // 2  # the new weights sample
        same = sum(a == b for a, b in zip(moved, _hf_greedy(model, prompts, stop, 12), strict=True))
        assert same >= 0.75 * len(prompts), same
        with torch.no_grad():
            for p, s in zip(lora_b, saved, strict=True):
                p.copy_(s)
        assert vllm_greedy() == start  # restored: the first samples again
        assert len(list((tmp_path / "s").glob("adapter-*"))) == 1  # one adapter folder kept at a time
    finally:
        sampler.close()


@pytest.mark.vllm
@pytest.mark.integration
@needs_vllm
def test_a_gkd_run_samples_on_policy_through_vllm(tmp_path):
    """Two GKD steps on the offline pair with every batch on-policy through vLLM: the run says which sampler drew,
    counts the sampled batches and tokens, and keeps the first samples for reading."""
    recipe = {
        "teacher": {"model": "builtin:qwen2.5-coder-1.5b-instruct", "dtype": "bfloat16"},
        "student": {"model": "builtin:qwen2.5-coder-0.5b-instruct", "dtype": "bfloat16"},
        "task": {"name": "arithmetic", "n_train": 8, "n_test": 4},
        "method": {"name": "gkd", "lmbda": 1.0, "sampler": "vllm"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-4, "max_length": 96},
        "evaluation": {"teacher": False, "student": False},
        "output_dir": str(tmp_path / "run"),
    }
    res = pktransfer.run(recipe_from_dict(recipe), quiet=True)
    m = res.run["method"]
    assert m["sampler"] == "vllm" and m["student_sampled_batches"] == 2
    assert res.run["budget"]["student_generated_tokens"] > 0 and m["first_samples"]
