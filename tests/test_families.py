"""Every supported family on tiny random pairs built here: every method's contract end to end.

Families: Llama and Mistral (the layout LaTen's and Seeking's papers use); Qwen3 (per-head q/k norms,
head_dim independent of hidden/heads); Gemma 2 (scaled embeddings, sandwich norms, final logit
soft-capping, head_dim 2·hidden/heads); Gemma 3 text (as Gemma 2, with q/k norms); OLMo-2 (post-norms
only, q/k norms over the whole projection); Phi-3 (q/k/v fused in qkv_proj, gate/up in gate_up_proj: see
test_fused.py for the per-role equivalence with an unfused model). Seeking's and weight selection's step-0 identity is in
test_tied.py and the diagnosis in test_diagnose.py. This file checks that each family's declarative entry
describes the model (the residual stream decomposes into its sublayer outputs; the logit lens reproduces
the model's own logits), runs every method through `pkt run`, and checks LaTen's merged = original + delta.
"""

from __future__ import annotations

import pytest
import torch

import pktransfer
from pktransfer.recipe import recipe_from_dict

# Qwen2 (the offline pair's family) runs through the rest of the suite; every other family runs here
NEW_FAMILIES = ["llama", "mistral", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3"]


@pytest.fixture(scope="module")
def family_pairs(tmp_path_factory):
    """Per family: an untied teacher and a tied student (every one of these families allows both)."""
    from conftest import STUDENT_SHAPE, TEACHER_SHAPE, save_tiny

    root = tmp_path_factory.mktemp("families")
    return {
        f: (
            save_tiny(root, f"{f}-t", f, seed=21, **TEACHER_SHAPE),
            save_tiny(root, f"{f}-s", f, seed=22, tied=True, **STUDENT_SHAPE),
        )
        for f in NEW_FAMILIES
    }


def _recipe(tiny_recipe, pair, tmp_path, method: dict):
    tiny_recipe["teacher"]["model"], tiny_recipe["student"]["model"] = str(pair[0]), str(pair[1])
    tiny_recipe["task"]["params"]["sizes"].update(extract=3, align=24)
    tiny_recipe["method"] = method
    tiny_recipe["output_dir"] = str(tmp_path / method["name"])
    tiny_recipe["evaluation"]["teacher"] = False
    tiny_recipe["training"]["max_length"] = 128  # every extract item keeps its response
    return recipe_from_dict(tiny_recipe)


def _load(folder):
    from pktransfer.models import load_model
    from pktransfer.recipe import ModelSpec

    return load_model(ModelSpec(model=str(folder)))


def test_qwen3_description_keeps_its_own_head_dim(family_pairs):
    desc = _load(family_pairs["qwen3"][1]).arch
    assert desc.family == "qwen3" and desc.head_dim == 128 and desc.head_dim * desc.n_heads != desc.hidden_size
    assert desc.tied_embeddings


def test_gemma2_description_reads_softcap_and_post_norms(family_pairs):
    desc = _load(family_pairs["gemma2"][1]).arch
    assert desc.logit_softcap == 3.0 and desc.post_norms and desc.tied_embeddings
    assert desc.head_dim * desc.n_heads == 2 * desc.hidden_size
    assert desc.sublayer_name(1, "mlp") == "model.layers.1.post_feedforward_layernorm"
    assert _load(family_pairs["qwen3"][1]).arch.sublayer_name(1, "mlp") == "model.layers.1.mlp"


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_residual_stream_decomposes_into_the_declared_sublayer_outputs(family_pairs, family):
    """block output = block input + attention contribution + MLP contribution, with the contributions read
    where the family entry says (after the post-norms in Gemma and OLMo-2): what LaTen and SemAlign rely on."""
    loaded = _load(family_pairs[family][0])
    model, arch = loaded.model, loaded.arch
    seen = {}
    hooks = []
    for i in range(arch.n_layers):
        block = model.get_submodule(f"{arch.layers_path}.{i}")

        def pre(mod, args, kwargs, i=i):
            seen[("in", i)] = args[0] if args else kwargs["hidden_states"]

        def post(key):
            return lambda mod, args, out: seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)

        hooks += [
            block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(post(("out", i))),
            model.get_submodule(arch.sublayer_name(i, "attention")).register_forward_hook(post(("attn", i))),
            model.get_submodule(arch.sublayer_name(i, "mlp")).register_forward_hook(post(("mlp", i))),
        ]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 17, 30, 44, 60, 71]]))
    for h in hooks:
        h.remove()
    for i in range(arch.n_layers):
        total = seen[("in", i)] + seen[("attn", i)] + seen[("mlp", i)]
        assert torch.allclose(total, seen[("out", i)], atol=1e-5), (family, i)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_logit_lens_reproduces_the_models_own_logits(family_pairs, family):
    """LaTen's lens (final norm, head, the family's soft-cap) on the last residual = the model's log-probs."""
    from pktransfer.ops.neurons import log_prob

    loaded = _load(family_pairs[family][0])
    model, arch = loaded.model, loaded.arch
    ids = torch.tensor([[5, 17, 30, 44, 60, 71]])
    with torch.no_grad():
        pre_norm = {}  # the last residual, as it enters the final norm
        hook = model.get_submodule(arch.final_norm_module).register_forward_pre_hook(
            lambda m, args: pre_norm.__setitem__("h", args[0])
        )
        out = model(input_ids=ids)
        hook.remove()
        h = pre_norm["h"][0, -1]
        head = model.get_output_embeddings().weight
        norm = model.get_submodule(arch.final_norm_module)
        want = torch.log_softmax(out.logits[0, -1].float(), -1)
        for y in (3, 40, 77):
            assert log_prob(h.reshape(1, -1), norm, head, y, arch.logit_softcap)[0] == pytest.approx(float(want[y]), abs=1e-4)
    if family == "gemma2":  # the cap matters here: without it the lens would not match
        raw = torch.log_softmax(norm(h.reshape(1, -1)).float() @ head.float().T, -1)[0]
        assert not torch.allclose(raw, want, atol=1e-3)


def test_post_norm_gain_is_the_norm_at_its_operating_point():
    """gain ⊙ x = RMSNorm(x) for the post-norms of Gemma 2 (offset 1) and OLMo-2 (offset 0)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from pktransfer.ops.neurons import post_norm_gain

    torch.manual_seed(0)
    x = torch.randn(16)
    for norm, offset in ((Gemma2RMSNorm(16, eps=1e-6), 1.0), (Olmo2RMSNorm(16, eps=1e-6), 0.0)):
        with torch.no_grad():
            norm.weight.normal_()
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        gain = post_norm_gain(x, norm.weight.detach(), eps, offset)
        assert torch.allclose(gain * x, norm(x.reshape(1, -1))[0].detach(), atol=1e-6)
    # by hand: x = [3, 4], weight 0, offset 1 -> gain = 1 / sqrt(12.5)
    assert torch.allclose(post_norm_gain(torch.tensor([3.0, 4.0]), torch.zeros(2), 0.0, 1.0), torch.full((2,), 12.5**-0.5))


METHODS = [
    {"name": "lora"},
    {"name": "pissa"},
    {"name": "kd"},
    {"name": "seeking", "n_seed": 3},
    {"name": "weight_selection"},
    {"name": "semalign", "critical_layers": "all"},
]


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_method_trains_and_evaluates(tiny_recipe, family_pairs, tmp_path, family, method):
    res = pktransfer.run(_recipe(tiny_recipe, family_pairs[family], tmp_path, dict(method)), quiet=True)
    assert res.run["training"]["steps"] == 4 and res.metrics["trained"]["test"]["n"] == 6
    if method["name"] == "semalign":
        assert [p["student"] for p in res.run["method"]["pairs"]] == [1, 2]  # targets computed for both layers


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_laten_merged_equals_original_plus_delta(tiny_recipe, family_pairs, tmp_path, family):
    from conftest import assert_merged_is_original_plus_delta

    spec = {"name": "laten", "n_val": 6, "checkpoint": 2, "init_std": 0.02, "lr": 1e-3, "transfer_rate": 0.2}
    res = pktransfer.run(_recipe(tiny_recipe, family_pairs[family], tmp_path, spec), quiet=True)
    assert_merged_is_original_plus_delta(res.output_dir, family_pairs[family][1], 4 * 2)


def test_a_family_we_cannot_map_gets_one_clear_error(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig

    from pktransfer.errors import ModelError

    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mixtral")
    with pytest.raises(ModelError, match=r"'mixtral' model.*mixture of experts") as err:
        _load(tmp_path / "mixtral")
    assert "supported family" in err.value.hint
