"""Fixtures: tiny random teacher/student models (Qwen2 and Llama) built in a temporary folder.

No downloads: a character-level tokenizer with a chat template is built with ``tokenizers`` and the
models are random-initialised from small configs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def benchmark_data() -> Path | None:
    """The benchmark data the data-reading tests use: $PKT_DATA_DIR (CI sets it), if it holds the benchmarks."""
    env = os.environ.get("PKT_DATA_DIR")
    return Path(env) if env and (Path(env) / "mmlu").is_dir() else None


DATA = benchmark_data()
if DATA is None and os.environ.get("PKT_REQUIRE_DATA") == "1":  # CI: data it is meant to have must not be skipped
    raise pytest.UsageError(f"PKT_REQUIRE_DATA=1 but no benchmark data at PKT_DATA_DIR={os.environ.get('PKT_DATA_DIR')}")
needs_data = pytest.mark.skipif(DATA is None, reason="benchmark data not found: set PKT_DATA_DIR")


# Tests on tiny random models check exact references in float32: ``dtype: auto`` would pick bfloat16 on a CPU with
# native bf16 (tests/test_dtype.py tests that choice itself)
os.environ.setdefault("PKT_CPU_AUTO_DTYPE", "float32")


SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


# family -> transformers config class; the families beyond the first four are built the same way
FAMILY_CONFIGS = {
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "olmo2": "Olmo2Config",
    "phi3": "Phi3Config",
}


def make_model(
    family: str,
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: int,
    seed: int = 0,
    tied: bool = False,
    positions: int = 512,
):
    import transformers
    from transformers import AutoModelForCausalLM

    cls = getattr(transformers, FAMILY_CONFIGS[family])
    extra = {}
    if family not in ("qwen2", "qwen3", "llama", "mistral"):  # their defaults name token ids outside a tiny vocab
        extra = dict(pad_token_id=1, bos_token_id=None, eos_token_id=3)
    if family in ("gemma2", "gemma3_text"):  # head_dim not hidden/heads, as in the real models; soft-capping on
        extra |= dict(head_dim=2 * hidden // heads, query_pre_attn_scalar=2 * hidden // heads, sliding_window=16)
        if family == "gemma2":
            extra["final_logit_softcapping"] = 3.0  # small, so that the tiny models' logits are really capped
    cfg = cls(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        max_position_embeddings=positions,
        tie_word_embeddings=tied,
        **extra,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def save_tiny(root: Path, name: str, family: str, chat: bool = True, **shape) -> Path:
    folder = root / name
    tok = make_tokenizer(chat)
    model = make_model(family, vocab=len(tok), **shape)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TEACHER_SHAPE = dict(hidden=64, layers=4, heads=4, kv_heads=2, ffn=128)
STUDENT_SHAPE = dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "qwen2_teacher": save_tiny(root, "qwen2_teacher", "qwen2", seed=1, **TEACHER_SHAPE),
        "qwen2_student": save_tiny(root, "qwen2_student", "qwen2", seed=2, **STUDENT_SHAPE),
        "llama_teacher": save_tiny(root, "llama_teacher", "llama", seed=3, **TEACHER_SHAPE),
        "llama_student": save_tiny(root, "llama_student", "llama", seed=4, **STUDENT_SHAPE),
        "llama_plain": save_tiny(root, "llama_plain", "llama", chat=False, seed=5, **STUDENT_SHAPE),
        "mistral_student": save_tiny(root, "mistral_student", "mistral", seed=6, **STUDENT_SHAPE),
    }


@pytest.fixture
def tiny_recipe(tiny_models, tmp_path):
    """A fast recipe on the tiny Qwen2 pair and a small arithmetic task (a dict: tests tweak it)."""
    return {
        "teacher": {"model": str(tiny_models["qwen2_teacher"]), "device": "cpu"},
        "student": {"model": str(tiny_models["qwen2_student"]), "device": "cpu"},
        "task": {
            "name": "arithmetic",
            "n_train": 16,
            "n_test": 6,
            "params": {"sizes": {"test": 6, "train": 16, "seed": 4, "extract": 2, "align": 2}},
        },
        "method": {"name": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "max_length": 64, "save_steps": 2, "logging_steps": 1},
        "evaluation": {"batch_size": 4, "max_new_tokens": 4},
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
    }


def bf16_training_runs(recipe: dict, workdir: Path, key: str, settings: list[tuple[str, object]]) -> dict[str, dict]:
    """Train a tiny recipe's bfloat16 student (LoRA dropout 0.05, no evaluation) once per ``(name, value)`` of
    ``training.<key>``, each into ``workdir/name``; every run must take 4 steps to a finite loss. Returns the
    run.json of each by name."""
    import math

    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    recipe["student"]["dtype"] = "bfloat16"
    recipe["lora"]["dropout"] = 0.05
    recipe["evaluation"].update(teacher=False, student=False)
    runs = {}
    for name, value in settings:
        recipe["training"][key] = value
        recipe["output_dir"] = str(workdir / name)
        run = pktransfer.run(recipe_from_dict(recipe), quiet=True, evaluate=False).run
        assert run["training"]["steps"] == 4 and math.isfinite(run["training"]["final_loss"]), name
        runs[name] = run
    return runs


def tiny_method_context(recipe, workdir: Path, n_examples: int = 8):
    """A method and its context on a recipe's (tiny) pair: student, task, formatter, the first
    ``n_examples`` training examples, and the teacher loaded up front. Returns (method, ctx)."""
    from pktransfer.data import PromptFormatter, encode_items, get_task
    from pktransfer.methods import MethodContext, get_method
    from pktransfer.models import load_model
    from pktransfer.progress import Progress

    student = load_model(recipe.student)
    task = get_task(recipe.task.name, recipe.task.params)
    fmt = PromptFormatter(student.tokenizer)
    examples = encode_items(fmt, task.split("train")[:n_examples], 64, "train")
    teacher = load_model(recipe.teacher)
    ctx = MethodContext(recipe, student, task, fmt, workdir, Progress(quiet=True), lambda: teacher, examples)
    return get_method(recipe.method), ctx


def assert_merged_is_original_plus_delta(out: Path, original_folder, n_modules: int) -> None:
    """LaTen's saved ``merged/`` equals the original student plus ``laten/delta.safetensors``, exactly,
    and the delta changes every one of its ``n_modules`` modules."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    original = AutoModelForCausalLM.from_pretrained(str(original_folder)).state_dict()
    delta = load_file(str(out / "laten" / "delta.safetensors"))
    modules = {k.split("::")[0] for k in delta}
    assert len(modules) == n_modules
    for key in original:
        expected = original[key].clone()
        name = key.removesuffix(".weight")
        if name in modules:
            if f"{name}::rows" in delta:
                expected[delta[f"{name}::rows"]] += delta[f"{name}::values"]
            else:
                expected[:, delta[f"{name}::cols"]] += delta[f"{name}::values"].T
            assert not torch.equal(expected, original[key]), key  # the transfer is in the saved weights
        assert torch.equal(merged[key], expected), key
