"""Fused projections (Phi-3's qkv_proj and gate_up_proj): every role is read, selected and injected inside
its own block of rows.

The reference is exact: a tiny Llama model rewritten as a Phi-3 model with the same weights (qkv_proj =
[q; k; v], gate_up_proj = [gate; up]) computes the same function, so every per-role quantity on the fused
model must equal the unfused model's: the sensitivity (per-role column sums included), Seeking's and
weight selection's extracted matrices (stacked), LaTen's injected rows, and the diagnosis's blocks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import STUDENT_SHAPE, TEACHER_SHAPE, save_tiny

from pktransfer.models.arch import lora_ranks, lora_targets, widened_targets
from pktransfer.ops.sensitivity import ParamSensitivity, accumulate

IDS = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])
# the config fields a Llama and a Phi-3 model share (everything else is at the defaults both use)
SHARED_CONFIG = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
)  # fmt: skip


def as_phi3(llama_folder, out):
    """The Llama checkpoint in ``llama_folder`` rewritten as a Phi-3 checkpoint computing the same function."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config

    llama = AutoModelForCausalLM.from_pretrained(str(llama_folder))
    phi = AutoModelForCausalLM.from_config(Phi3Config(**{k: getattr(llama.config, k) for k in SHARED_CONFIG}))
    llama_state, state = llama.state_dict(), {}
    for name, value in llama_state.items():
        if ".self_attn.q_proj." in name:
            k, v = (llama_state[name.replace("q_proj", r)] for r in ("k_proj", "v_proj"))
            state[name.replace("q_proj", "qkv_proj")] = torch.cat([value, k, v])
        elif ".mlp.gate_proj." in name:
            state[name.replace("gate_proj", "gate_up_proj")] = torch.cat([value, llama_state[name.replace("gate", "up")]])
        elif not any(f".{r}." in name for r in ("k_proj", "v_proj", "up_proj")):
            state[name] = value
    missing, unexpected = phi.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    phi.tie_weights()
    phi.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(llama_folder)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(llama teacher, llama student) and the same pair as Phi-3 models; the student tied."""
    root = tmp_path_factory.mktemp("fused")
    lt = save_tiny(root, "llama-t", "llama", seed=31, **TEACHER_SHAPE)
    ls = save_tiny(root, "llama-s", "llama", seed=32, tied=True, **STUDENT_SHAPE)
    return {"llama": (lt, ls), "phi3": (as_phi3(lt, root / "phi3-t"), as_phi3(ls, root / "phi3-s"))}


def _load(folder):
    from pktransfer.models import load_model
    from pktransfer.recipe import ModelSpec

    return load_model(ModelSpec(model=str(folder)))


def test_the_rewritten_model_computes_the_same_function(twins):
    for i in (0, 1):
        a, b = _load(twins["llama"][i]), _load(twins["phi3"][i])
        assert b.arch.family == "phi3"
        with torch.no_grad():
            assert torch.allclose(a.model(input_ids=IDS).logits, b.model(input_ids=IDS).logits, atol=1e-5)


def test_declared_row_blocks_are_the_ones_transformers_splits(twins):
    """The family entry's order is what Phi3Attention / Phi3MLP read: doubling the declared up block doubles
    the MLP output (linear in up, not in gate); zeroing the declared v block zeroes the attention output."""
    phi = _load(twins["phi3"][1])
    arch, model = phi.arch, phi.model
    assert arch.role_rows("q") == slice(0, 32) and arch.role_rows("k") == slice(32, 48) and arch.role_rows("v") == slice(48, 64)
    assert (
        arch.role_rows("gate") == slice(0, 64) and arch.role_rows("up") == slice(64, 128) and arch.role_rows("o") == slice(None)
    )
    x = torch.randn(1, 5, arch.hidden_size)
    block = model.model.layers[0]
    with torch.no_grad():
        before = block.mlp(x)
        block.mlp.gate_up_proj.weight[arch.role_rows("up")] *= 2
        assert torch.allclose(block.mlp(x), 2 * before, atol=1e-6)
        block.self_attn.qkv_proj.weight[arch.role_rows("v")] = 0
        pos = torch.arange(5)[None]
        emb = model.model.rotary_emb(x, pos)
        out = block.self_attn(x, position_embeddings=emb, attention_mask=None)[0]
        assert torch.count_nonzero(out) == 0
    w = {wi.role: wi for wi in arch.layer_weights(0)}
    assert w["k"].module.endswith("qkv_proj") and w["k"].rows == (32, 48) and w["k"].shape == (16, 32)
    assert w["down"].rows is None
    assert arch.fused_parts()["model.layers.1.mlp.gate_up_proj.weight"] == (0, 64, 128)


def test_lora_targets_name_the_fused_modules():
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_targets("phi3", names) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_targets("llama", names) == names
    assert lora_targets("phi3", ["qkv_proj", "lm_head"]) == ["qkv_proj", "lm_head"]
    assert widened_targets("phi3", names) == {}
    assert widened_targets("phi3", ["up_proj", "down_proj", "v_proj"]) == {
        "gate_up_proj": ["gate_proj"],
        "qkv_proj": ["q_proj", "k_proj"],
    }
    assert widened_targets("llama", ["up_proj"]) == {}
    assert lora_ranks("phi3", {"q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 4}) == {"qkv_proj": 8, "o_proj": 4}
    with pytest.raises(ValueError, match="one rank for all of them"):
        lora_ranks("phi3", {"q_proj": 8, "k_proj": 4, "v_proj": 8})


def test_fused_accumulators_keep_column_sums_per_role():
    """Hand-checked: a [4, 3] weight fused as rows 0 | 1-3; chunks that straddle the boundary add up the same."""
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [2.0, 2.0, -1.0], [1.0, 0.0, 3.0]])
    g = torch.tensor([[1.0, 1.0, 2.0], [5.0, -1.0, 1.0], [0.5, 1.0, 1.0], [-1.0, 4.0, 1.0]])
    s = (w * g).abs()
    for chunk in (3, 6, 1 << 18):  # one row, two rows (the boundary inside a chunk), everything
        acc = ParamSensitivity.empty((4, 3), "full", parts=(0, 1, 4))
        accumulate(acc, w, g, chunk_elems=chunk)
        assert torch.equal(acc.cols, torch.stack([s[:1].sum(0), s[1:].sum(0)]))
        v = acc.role(slice(1, 4))
        assert v.shape == (3, 3) and torch.equal(v.full, s[1:]) and torch.equal(v.rows, s[1:].sum(1))
        assert torch.equal(v.cols, torch.tensor([2.0, 3.0, 5.0])) and float(v.total) == 10.0
        assert acc.role(slice(None)) is acc
    with pytest.raises(ValueError, match="not one of the fused blocks"):
        acc.role(slice(0, 2))
    with pytest.raises(ValueError, match="do not split"):
        ParamSensitivity.empty((4, 3), "full", parts=(0, 2, 5))


def _seeking_matrices(pair, structure):
    from pktransfer.data import PromptFormatter, get_task
    from pktransfer.methods.injection import group_roles
    from pktransfer.methods.seeking import SeekingConfig, compute_sensitivity, extract_matrices
    from pktransfer.progress import Progress

    teacher, student = _load(pair[0]), _load(pair[1])
    task = get_task("arithmetic", {"sizes": {"test": 2, "train": 4, "seed": 3, "extract": 2, "align": 2}})
    roles = group_roles(["all"])
    spec = SeekingConfig(n_seed=3, structure=structure)
    sens = compute_sensitivity(
        teacher, task.split("seed"), spec, roles, formatter=PromptFormatter(teacher.tokenizer), max_length=64,
        progress=Progress(quiet=True), what="seed",
    )  # fmt: skip
    return sens, extract_matrices(sens, teacher, student.arch, [0, 2], roles, structure, seed=3, grow="error")


@pytest.mark.parametrize("structure", ["submatrix", "row_column", "neuron", "random"])
def test_seeking_on_the_fused_model_extracts_the_unfused_models_blocks(twins, structure):
    sens_l, llama = _seeking_matrices(twins["llama"], structure)
    sens_p, phi = _seeking_matrices(twins["phi3"], structure)
    fused = sens_p.params["model.layers.2.self_attn.qkv_proj.weight"]
    for role, rows in (("q", slice(0, 64)), ("k", slice(64, 96)), ("v", slice(96, 128))):
        own = sens_l.params[f"model.layers.2.self_attn.{role}_proj.weight"]
        part = fused.role(rows)
        assert torch.allclose(part.cols, own.cols, rtol=1e-4) and torch.allclose(part.rows, own.rows, rtol=1e-4)
    assert set(phi) == {
        m.replace("q_proj", "qkv_proj").replace("gate_proj", "gate_up_proj")
        for m in llama
        if not any(r in m for r in ("k_proj", "v_proj", "up_proj"))
    }
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        qkv = torch.cat([llama[f"{p}.self_attn.{r}_proj"] for r in "qkv"])
        gate_up = torch.cat([llama[f"{p}.mlp.{r}_proj"] for r in ("gate", "up")])
        assert torch.allclose(phi[f"{p}.self_attn.qkv_proj"], qkv, atol=1e-6), (structure, layer)
        assert torch.allclose(phi[f"{p}.mlp.gate_up_proj"], gate_up, atol=1e-6), (structure, layer)
        assert torch.equal(phi[f"{p}.mlp.down_proj"], llama[f"{p}.mlp.down_proj"])


def test_weight_selection_on_the_fused_model_selects_the_unfused_models_blocks(twins):
    from pktransfer.methods.weight_selection import selected_matrices, selection_plan

    out = {}
    for fam in ("llama", "phi3"):
        teacher, student = _load(twins[fam][0]), _load(twins[fam][1])
        layers, idx = selection_plan(teacher.arch, student.arch, "first")
        out[fam] = selected_matrices(teacher, student.arch, layers, idx, {"q", "k", "v", "o", "gate", "up", "down", "embed"})
    llama, phi = out["llama"], out["phi3"]
    p = "model.layers.1"
    assert torch.equal(phi[f"{p}.self_attn.qkv_proj"], torch.cat([llama[f"{p}.self_attn.{r}_proj"] for r in "qkv"]))
    assert torch.equal(phi[f"{p}.mlp.gate_up_proj"], torch.cat([llama[f"{p}.mlp.{r}_proj"] for r in ("gate", "up")]))
    assert torch.equal(phi["model.embed_tokens"], llama["model.embed_tokens"])


def test_laten_injects_into_the_roles_own_rows(twins):
    """The same located neurons and deltas, hooked and merged: the fused student equals the unfused one."""
    from pktransfer.ops.hypernet import Injection
    from pktransfer.ops.location import ROLES

    g = torch.Generator().manual_seed(0)
    a = STUDENT_SHAPE
    plan = {
        "ffn": {"student": [torch.tensor([3, 40, 7]), torch.tensor([0, 63, 12])]},
        "attn": {"student": [torch.tensor([1, 30, 17]), torch.tensor([8, 9, 31])]},
    }
    logits, weights = {}, {}
    for fam in ("llama", "phi3"):
        student = _load(twins[fam][1])
        inj = Injection(student, plan)
        if fam == "llama":
            deltas = {
                r: [torch.randn(len(inj.index[r][k]), a["hidden"], generator=g) * 0.1 for k in range(a["layers"])] for r in ROLES
            }
        handles = inj.hooks(student.model, deltas)
        with torch.no_grad():
            logits[fam] = student.model(input_ids=IDS).logits
        for h in handles:
            h.remove()
        inj.merge(student.model, deltas)
        with torch.no_grad():
            assert torch.allclose(student.model(input_ids=IDS).logits, logits[fam], atol=1e-5)  # merged = hooked
        weights[fam] = {k: v.detach().clone() for k, v in student.model.state_dict().items()}
    assert torch.allclose(logits["phi3"], logits["llama"], atol=1e-5)
    lw, pw = weights["llama"], weights["phi3"]
    for i in range(a["layers"]):
        p = f"model.layers.{i}"
        assert torch.equal(pw[f"{p}.self_attn.qkv_proj.weight"], torch.cat([lw[f"{p}.self_attn.{r}_proj.weight"] for r in "qkv"]))
        assert torch.equal(
            pw[f"{p}.mlp.gate_up_proj.weight"], torch.cat([lw[f"{p}.mlp.{r}_proj.weight"] for r in ("gate", "up")])
        )


def test_a_lora_naming_one_fused_role_trains_the_whole_module_and_says_so(tiny_recipe, twins, tmp_path):
    """SemAlign's paper targets (up, down, v, o) on Phi-3: the LoRAs go on gate_up_proj and qkv_proj whole, the
    run warns which roles that adds, and the adapter loads with plain peft."""
    import io

    from peft import PeftConfig
    from rich.console import Console

    import pktransfer
    from pktransfer.progress import Progress
    from pktransfer.recipe import recipe_from_dict

    tiny_recipe["teacher"]["model"], tiny_recipe["student"]["model"] = (str(f) for f in twins["phi3"])
    tiny_recipe["lora"]["target_modules"] = ["up_proj", "down_proj", "v_proj", "o_proj"]
    tiny_recipe["method"] = {"name": "weight_selection"}
    buf = io.StringIO()
    res = pktransfer.run(recipe_from_dict(tiny_recipe), progress=Progress(quiet=True, console=Console(file=buf, width=300)))
    assert set(PeftConfig.from_pretrained(str(res.output_dir / "adapter")).target_modules) == {
        "gate_up_proj", "down_proj", "qkv_proj", "o_proj"
    }  # fmt: skip
    said = " ".join(buf.getvalue().split())
    assert "phi3 fuses gate_up_proj; its LoRA also trains gate_proj" in said
    assert "phi3 fuses qkv_proj; its LoRA also trains q_proj, k_proj" in said
