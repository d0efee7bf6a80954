from __future__ import annotations

import pytest
import torch

from pktransfer.errors import ModelError
from pktransfer.models import describe, describe_config, load_model
from pktransfer.recipe import ModelSpec


@pytest.mark.parametrize("name", ["qwen2_teacher", "qwen2_student", "llama_teacher", "llama_student", "mistral_student"])
def test_description_matches_the_real_weights(tiny_models, name):
    loaded = load_model(ModelSpec(model=str(tiny_models[name]), device="cpu"))
    desc = loaded.arch
    params = dict(loaded.model.named_parameters())
    assert desc.family in ("qwen2", "llama", "mistral")
    assert len(desc.layer_names) == desc.n_layers == loaded.model.config.num_hidden_layers
    for w in desc.weights():
        assert tuple(params[w.module + ".weight"].shape) == w.shape, w
    assert desc.head_dim * desc.n_heads == desc.space_size("heads")
    assert desc.vocab_size == loaded.model.config.vocab_size
    assert desc.tied_embeddings is False
    assert desc.attention_bias == (desc.family == "qwen2")
    assert desc.n_parameters == sum(p.numel() for p in loaded.model.parameters())


def test_gqa_shapes(tiny_models):
    desc = load_model(ModelSpec(model=str(tiny_models["qwen2_teacher"]), device="cpu")).arch
    k = next(w for w in desc.layer_weights(0) if w.role == "k")
    assert k.shape == (desc.n_kv_heads * desc.head_dim, desc.hidden_size)
    assert desc.n_kv_heads == 2 and desc.n_heads == 4


def test_tied_embeddings_detected(tmp_path):
    import sys

    sys.path.insert(0, "tests")
    from conftest import make_model

    m = make_model("llama", hidden=16, layers=1, heads=2, kv_heads=1, ffn=32, vocab=50, tied=True)
    assert describe(m).tied_embeddings is True


def test_unsupported_family_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        describe_config(GPT2Config(), "gpt2")


def test_dtype_and_device(tiny_models):
    loaded = load_model(ModelSpec(model=str(tiny_models["llama_student"]), device="cpu", dtype="bfloat16"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.device.type == "cpu"


def test_missing_and_unknown_models(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelSpec(model=str(tmp_path / "nothing"), device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(ModelSpec(model=str(tmp_path / "empty"), device="cpu"))
    with pytest.raises(ModelError, match="unknown builtin"):
        load_model(ModelSpec(model="builtin:gpt-17", device="cpu"))
