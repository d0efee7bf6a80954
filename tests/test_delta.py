"""Teacher-delta transport (Theseus): the Procrustes math by hand, and the method on tiny pairs where the answer is
known: an identity pair gets the teacher's delta, a rotated student the rotated delta, and step 0 is the transport."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pktransfer.ops.procrustes import energy_beyond_rank, procrustes_map, procrustes_with_rank, transport


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_procrustes_recovers_a_rotation_and_maps_only_the_observed_span():
    g = torch.Generator().manual_seed(0)
    q = _orthogonal(6, 1)
    a = torch.randn(40, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(procrustes_map(a, a @ q).double(), q, atol=1e-5)  # enough rows: the rotation itself
    assert torch.allclose(procrustes_map(a, a).double(), torch.eye(6, dtype=torch.float64), atol=1e-5)
    # 3 distinct rows in 6 dimensions, as 3 rows or repeated to 30 (both paths): exact on the rows' span, zero on its
    # complement (not an arbitrary completion), determined on rank 3
    few = a[:3]
    complement = torch.linalg.svd(few, full_matrices=True).Vh[3:]  # directions no row visits
    for rows in (few, few.repeat(10, 1)):
        t, k = procrustes_with_rank(rows, rows @ q)
        assert k == 3 and torch.allclose(rows @ t.double(), rows @ q, atol=1e-5)
        assert torch.allclose(complement @ t.double(), torch.zeros(3, 6, dtype=torch.float64), atol=1e-5)
    # widths may differ: 6 -> 4 coordinates of a rotated copy (a semi-orthogonal map, columns orthonormal)
    t = procrustes_map(a, (a @ q)[:, :4]).double()
    assert t.shape == (6, 4) and torch.allclose(t.T @ t, torch.eye(4, dtype=torch.float64), atol=1e-5)
    with pytest.raises(ValueError, match="rows differ"):
        procrustes_map(a, a[:5])


def test_transport_and_truncated_energy_by_hand():
    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # T_outᵀ Δ T_in with T_in = swap (columns swapped), T_out = identity
    assert torch.equal(transport(delta, swap, torch.eye(2)), torch.tensor([[2.0, 1.0], [4.0, 3.0]]))
    assert torch.equal(transport(delta, torch.eye(2), swap), torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    # singular values 4 and 3: rank 1 keeps 16 of 25
    assert energy_beyond_rank(torch.diag(torch.tensor([3.0, 4.0])), 1) == pytest.approx(9 / 25)
    assert energy_beyond_rank(torch.zeros(3, 3), 1) == 0.0
    assert energy_beyond_rank(torch.outer(torch.ones(3), torch.arange(3.0)), 1) == pytest.approx(0.0, abs=1e-12)


def _teacher_adapter(model_dir: Path, out: Path, r: int = 4, seed: int = 7) -> Path:
    """A random LoRA on every projection of the model in ``model_dir`` (both factors non-zero), saved at ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def _deltas(adapter: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """Module name -> the adapter's dense update, as peft applies it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter))
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            out[name] = module.get_delta_weight("default").detach().float()
    return out


@pytest.fixture
def diverse_seed(monkeypatch):
    """Seed items holding every character of the tiny tokenizer, so the activations of every layer (the first
    layer's are just the distinct tokens' embeddings) span the tiny models' widths and the Procrustes maps are
    determined everywhere; with fewer distinct inputs a map is only determined on the span they visit."""
    import random

    from pktransfer.data.arithmetic import ArithmeticTask
    from pktransfer.data.tasks import Item

    chars = [chr(i) for i in range(32, 127)]
    load = ArithmeticTask._load

    def seeded(self, split):
        if split != "seed":
            return load(self, split)
        rng = random.Random(0)
        return [Item(f"diverse-{k}", "".join(rng.sample(chars, len(chars))), "1", "1") for k in range(4)]

    monkeypatch.setattr(ArithmeticTask, "_load", seeded)


def _run_delta(tiny_recipe: dict, student: Path, adapter: Path, tmp_path: Path, **method) -> tuple[dict, Path]:
    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    tiny_recipe["student"]["model"] = str(student)
    tiny_recipe["method"] = {"name": "delta", "teacher_adapter": str(adapter), **method}
    tiny_recipe["training"].update(max_steps=0, max_length=128)
    tiny_recipe["lora"]["r"] = 4
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["output_dir"] = str(tmp_path / "delta-run")
    tiny_recipe["training"]["save_merged"] = True
    res = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    return res.run, res.output_dir


def _merged_minus_student(out: Path, student: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    merged = dict(AutoModelForCausalLM.from_pretrained(str(out / "merged")).named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(str(student)).named_parameters())
    return {k[: -len(".weight")]: (merged[k] - base[k]).detach() for k in base if k.endswith("proj.weight")}


def test_an_identity_pair_receives_the_teachers_delta_exactly(tiny_models, tiny_recipe, tmp_path, diverse_seed):
    teacher = Path(tiny_recipe["teacher"]["model"])
    student = shutil.copytree(teacher, tmp_path / "same-as-teacher")  # the same weights under another name
    adapter = _teacher_adapter(teacher, tmp_path / "adapter")
    run, out = _run_delta(tiny_recipe, student, adapter, tmp_path)
    got, want = _merged_minus_student(out, student), _deltas(adapter, teacher)
    assert set(got) == set(want) and len(want) == 4 * 7
    for name, d in want.items():
        assert torch.allclose(got[name], d, atol=2e-4), name
    assert run["method"]["teacher_layers_dropped"] == [] and run["method"]["energy_in_base"] < 1e-6
    assert run["training"]["steps"] == 0 and not run["method"]["residual_saved"]


def _rotated_copy(folder: Path, out: Path, q: torch.Tensor) -> Path:
    """The model in ``folder`` with its residual stream rotated by Q (h' = Q h): it computes the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    q = q.float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue  # set to ones below, in both models: RMSNorm's gain does not commute with a rotation
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                p.copy_(p @ q.T)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(q @ p)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.copy_(p @ q.T)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
    return out


def _unit_norms(folder: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
    return out


def test_a_rotated_student_receives_the_rotated_delta(tiny_models, tiny_recipe, tmp_path, diverse_seed):
    from transformers import AutoModelForCausalLM

    teacher = _unit_norms(Path(tiny_recipe["teacher"]["model"]), tmp_path / "teacher")
    tiny_recipe["teacher"]["model"] = str(teacher)
    q = _orthogonal(64, 3)
    student = _rotated_copy(teacher, tmp_path / "rotated", q)
    ids = torch.tensor([[5, 17, 33, 60, 8, 41]])
    with torch.no_grad():  # the rotated copy is the same function
        a = AutoModelForCausalLM.from_pretrained(str(teacher))(ids).logits
        b = AutoModelForCausalLM.from_pretrained(str(student))(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    adapter = _teacher_adapter(teacher, tmp_path / "adapter")
    _, out = _run_delta(tiny_recipe, student, adapter, tmp_path)
    got, want = _merged_minus_student(out, student), _deltas(adapter, teacher)
    qf = q.float()
    for name, d in want.items():
        leaf = name.rsplit(".", 1)[-1]
        rotated = qf @ d if leaf in ("o_proj", "down_proj") else d @ qf.T
        assert torch.allclose(got[name], rotated, atol=5e-4), (name, float((got[name] - rotated).abs().max()))


def test_step_zero_is_the_transported_model_and_a_wider_teacher_adapter_keeps_its_residual(tiny_models, tiny_recipe, tmp_path):
    """Teacher (hidden 64, 4 layers) -> student (hidden 32, 2 layers) with a rank-8 teacher adapter and a rank-4 student
    LoRA: the truncation leaves part of the update in the base; the merged student is the student plus the whole
    transported update, and the saved adapter plus the saved residual reproduce it."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    teacher, student = Path(tiny_recipe["teacher"]["model"]), Path(tiny_recipe["student"]["model"])
    adapter = _teacher_adapter(teacher, tmp_path / "adapter", r=8)
    run, out = _run_delta(tiny_recipe, student, adapter, tmp_path, layer_pairing="sum")
    info = run["method"]
    assert info["residual_saved"] and 0 < info["energy_in_base"] < 1 and info["layer_pairs"] == {"0": [0, 1], "1": [2, 3]}
    assert info["teacher_energy_dropped"] == 0.0 and (out / "merged").is_dir()
    residual = load_file(str(out / "delta_residual.safetensors"))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(student)), str(out / "adapter"))
    rebuilt = with_adapter.merge_and_unload()
    with torch.no_grad():
        for name, p in rebuilt.named_parameters():
            if name in residual:
                p.add_(residual[name])
    merged = dict(AutoModelForCausalLM.from_pretrained(str(out / "merged")).named_parameters())
    for name, p in rebuilt.named_parameters():
        assert torch.allclose(p, merged[name], atol=1e-5), name
    # uniform pairing: student layer i takes teacher layer 2i + 1; the other two teacher layers' energy is dropped
    run, _ = _run_delta(tiny_recipe, student, adapter, tmp_path / "uniform")
    assert run["method"]["layer_pairs"] == {"0": [1], "1": [3]} and run["method"]["teacher_layers_dropped"] == [0, 2]
    assert 0 < run["method"]["teacher_energy_dropped"] < 1


def test_with_seed_items_that_do_not_span_a_width_the_identity_pair_gets_the_delta_on_the_visited_span(
    tiny_models, tiny_recipe, tmp_path
):
    """The arithmetic seed items use a few dozen characters: the first layer's inputs span fewer than its 64
    dimensions. The map is then exact on the span and zero off it, so the identity pair receives the teacher's delta
    projected onto the visited input span (the official code's SVD would pair the rest arbitrarily)."""
    from transformers import AutoModelForCausalLM

    from pktransfer.data import PromptFormatter, encode_items, get_task
    from pktransfer.methods.delta import collect
    from pktransfer.models import describe

    teacher = Path(tiny_recipe["teacher"]["model"])
    student = shutil.copytree(teacher, tmp_path / "same-as-teacher")
    adapter = _teacher_adapter(teacher, tmp_path / "adapter")
    run, out = _run_delta(tiny_recipe, student, adapter, tmp_path)
    assert 0 < run["method"]["maps_on_partial_span"] < run["method"]["maps"]
    model = AutoModelForCausalLM.from_pretrained(str(teacher))
    task = get_task("arithmetic", tiny_recipe["task"]["params"])
    from transformers import AutoTokenizer

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(str(teacher)))
    inputs = [e.input_ids for e in encode_items(fmt, task.split("seed"), 128, "seed")]
    x, y = (r.double() for r in collect(model, describe(model), [(0, "q")], inputs, 1, 8)[(0, "q")])

    def projector(rows: torch.Tensor) -> torch.Tensor:
        s, vh = torch.linalg.svd(rows, full_matrices=False)[1:]
        basis = vh[s > 1e-6 * s[0]]
        return basis.T @ basis

    p_in, p_out = projector(x), projector(y)
    assert torch.linalg.matrix_rank(p_in) < 64  # the first layer's inputs do not span its width
    got = _merged_minus_student(out, student)["model.layers.0.self_attn.q_proj"].double()
    want = _deltas(adapter, teacher)["model.layers.0.self_attn.q_proj"].double()
    assert torch.allclose(got, p_out @ want @ p_in, atol=2e-4)


def test_a_fine_tuned_teacher_model_gives_the_same_start_as_its_adapter(tiny_models, tiny_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    teacher, student = Path(tiny_recipe["teacher"]["model"]), Path(tiny_recipe["student"]["model"])
    adapter = _teacher_adapter(teacher, tmp_path / "adapter")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(teacher)), str(adapter)).merge_and_unload()
    tuned.save_pretrained(str(tmp_path / "tuned"))
    AutoTokenizer.from_pretrained(str(teacher)).save_pretrained(str(tmp_path / "tuned"))
    _, out_a = _run_delta(dict(tiny_recipe), student, adapter, tmp_path / "a")
    tiny_recipe["method"] = {"name": "delta", "teacher_model": str(tmp_path / "tuned")}
    tiny_recipe["output_dir"] = str(tmp_path / "b")
    out_b = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True).output_dir
    a, b = _merged_minus_student(out_a, student), _merged_minus_student(out_b, student)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), name


def test_delta_composes_with_kd_and_trains_its_own_teacher_delta_when_given_none(tiny_recipe, tmp_path):
    import math

    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    tiny_recipe["method"] = {
        "name": "compose",
        "start": {"name": "delta", "teacher_training": {"epochs": 1, "r": 2}},
        "objective": {"name": "kd"},
    }
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    assert res.run["training"]["steps"] == 4 and math.isfinite(res.run["training"]["final_loss"])
    start = res.run["method"]["start"]
    assert start["source"].startswith("a LoRA trained here") and start["energy_in_base"] < 1e-6
    what = res.run["budget"]["teacher"]["what"]
    assert "delta: teacher fine-tuning" in what and "delta: activations for the Procrustes maps" in what
    assert res.run["budget"]["teacher"]["backward_tokens"] > 0


def test_bad_delta_sources_are_refused_clearly(tiny_recipe, tmp_path):
    import pktransfer
    from pktransfer.errors import PktError, RecipeError
    from pktransfer.recipe import recipe_from_dict

    tiny_recipe["method"] = {"name": "delta", "teacher_adapter": "a", "teacher_model": "b"}
    with pytest.raises(RecipeError, match="not both"):
        recipe_from_dict(tiny_recipe)
    tiny_recipe["method"] = {"name": "delta", "teacher_adapter": str(tmp_path / "nothing")}
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    with pytest.raises(PktError, match=r"has no adapter_config\.json"):
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    # an adapter of another model (the student's own shapes) does not fit the teacher
    student_adapter = _teacher_adapter(Path(tiny_recipe["student"]["model"]), tmp_path / "student-adapter")
    tiny_recipe["method"] = {"name": "delta", "teacher_adapter": str(student_adapter)}
    tiny_recipe["output_dir"] = str(tmp_path / "run2")
    with pytest.raises(PktError, match="does not fit the untouched teacher"):
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)


def test_pkt_transport_once_gives_the_same_student_and_a_grid_shares_it_across_seeds(tiny_models, tiny_recipe, tmp_path):
    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    teacher, student = Path(tiny_recipe["teacher"]["model"]), Path(tiny_recipe["student"]["model"])
    adapter = _teacher_adapter(teacher, tmp_path / "adapter")
    base = json.loads(json.dumps(tiny_recipe))
    run, direct = _run_delta(dict(tiny_recipe), student, adapter, tmp_path / "direct")
    # steps 1-4 alone, then a run that reads them: the same merged student, the same measurements
    recipe = json.loads(json.dumps(base))
    recipe.update(method={"name": "delta", "teacher_adapter": str(adapter)}, output_dir=str(tmp_path / "transport"))
    recipe["training"].update(max_steps=0, max_length=128, save_merged=True)
    recipe["lora"]["r"] = 4
    recipe["evaluation"].update(teacher=False, student=False)
    from typer.testing import CliRunner

    from pktransfer.cli import app

    (tmp_path / "r.yaml").write_text(json.dumps(recipe))  # YAML is a superset of JSON
    out = CliRunner().invoke(app, ["transport", str(tmp_path / "r.yaml"), "-q"])
    assert out.exit_code == 0, out.output
    assert "reuse with method.transport" in out.output
    assert (tmp_path / "transport" / "transport" / "updates.safetensors").is_file()
    recipe["method"]["transport"] = str(tmp_path / "transport" / "transport")
    recipe["output_dir"] = str(tmp_path / "reused")
    reused = pktransfer.run(recipe_from_dict(recipe), quiet=True)
    a, b = _merged_minus_student(direct, student), _merged_minus_student(reused.output_dir, student)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    keep = ("source", "fused_roles", "items", "energy_in_base", "teacher_layers_dropped")
    assert {k: reused.run["method"][k] for k in keep} == {k: run["method"][k] for k in keep}
    assert "delta: activations for the Procrustes maps" not in reused.run["budget"]["teacher"].get("what", [])
    # a grid's delta cells on two seeds read one shared transport, made once
    grid = json.loads(json.dumps(recipe))
    del grid["method"]["transport"]
    grid["output_dir"] = str(tmp_path / "grid")
    grid["compare"] = {"methods": [{"name": "delta", "teacher_adapter": str(adapter)}], "seeds": [0, 1]}
    grid["compare"]["baseline"] = "delta"
    res = pktransfer.compare(recipe_from_dict(grid), quiet=True)
    shared = [f for f in res.result["shared_work_seconds"] if f.startswith("shared/delta-")]
    assert len(shared) == 1
    for cell in res.result["cells"]:
        cell_run = json.loads((res.output_dir / cell["folder"] / "run.json").read_text())
        assert cell_run["recipe"]["method"]["transport"].endswith(f"{shared[0]}/transport")


def test_a_transport_folder_of_another_student_or_a_corrupt_one_is_refused(tiny_models, tiny_recipe, tmp_path):
    import pktransfer
    from pktransfer.errors import IncompatiblePairError, RecipeError
    from pktransfer.recipe import recipe_from_dict

    teacher = Path(tiny_recipe["teacher"]["model"])
    adapter = _teacher_adapter(teacher, tmp_path / "adapter")
    tiny_recipe.update(method={"name": "delta", "teacher_adapter": str(adapter)}, output_dir=str(tmp_path / "t"))
    tiny_recipe["training"].update(max_steps=0, max_length=128)
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    pktransfer.transport(recipe_from_dict(tiny_recipe), quiet=True)
    folder = tmp_path / "t" / "transport"
    other = json.loads(json.dumps(tiny_recipe))
    other["student"]["model"] = str(shutil.copytree(teacher, tmp_path / "another-student"))
    other["method"]["transport"] = str(folder)
    other["output_dir"] = str(tmp_path / "other")
    with pytest.raises(IncompatiblePairError, match="was made for the student"):
        pktransfer.run(recipe_from_dict(other), quiet=True)
    assert not (tmp_path / "other").exists()
    (folder / "updates.safetensors").write_bytes(b"not a safetensors file")
    tiny_recipe["method"]["transport"] = str(folder)
    tiny_recipe["output_dir"] = str(tmp_path / "corrupt")
    with pytest.raises(RecipeError, match="cannot be read"):
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    assert not (tmp_path / "corrupt").exists()
