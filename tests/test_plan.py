"""pkt plan: the byte counter on hand-checked values, the traced working sets against the same steps on real
tensors, the stages a run has, and the refusal on a device that is too small."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pktransfer.cli import app
from pktransfer.errors import RecipeError
from pktransfer.plan import (
    GIB,
    Batch,
    LiveBytes,
    Plan,
    Stage,
    check_fits,
    forward_peak,
    make_plan,
    model_shape,
    real_forward_peak,
    real_train_step_peak,
    train_step_peak,
)
from pktransfer.recipe import recipe_from_dict


def test_live_bytes_counts_new_storages_frees_them_and_keeps_the_peak():
    before = torch.ones(1000)  # exists before: neither it nor its views count
    with LiveBytes() as live:
        a = torch.zeros(100)  # 400 B
        b = torch.zeros(50, dtype=torch.float64)  # 400 B -> 800 live
        view = before[:10]  # a view of an older tensor: 0 B
        a.add_(1)  # in place: 0 B
        del a  # 400 live
        c = torch.zeros(25, dtype=torch.int16)  # 50 B -> 450 live
    assert live.peak == 800
    assert live.current == 450
    del b, c, view


def test_a_view_of_a_new_tensor_is_counted_once():
    with LiveBytes() as live:
        a = torch.zeros(10, 10)
        _ = a.t()
        _ = a[0]
    assert live.peak == 400


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_traced_working_sets_match_the_same_steps_on_real_tensors(tiny_recipe, dtype):
    rec = dict(tiny_recipe, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    rec["student"] = {**rec["student"], "dtype": dtype}
    recipe = recipe_from_dict(rec)
    shape = model_shape(recipe.student, "student", torch.device("cpu"))
    batch = Batch(4, 48, 8)
    traced, lora = train_step_peak(shape, recipe, batch, torch.device("cpu"))
    real = real_train_step_peak(shape, recipe, batch)
    assert lora > 0
    assert abs(traced / real - 1) < 0.15, (traced, real)  # the dropout's dropped positions are random in the real step
    assert forward_peak(shape, batch, logits="last") == real_forward_peak(shape, batch)


def test_model_shape_counts_the_weights_in_the_recipes_dtype(tiny_recipe):
    rec = dict(tiny_recipe)
    rec["student"] = {**rec["student"], "dtype": "bfloat16"}
    shape = model_shape(recipe_from_dict(rec).student, "student", torch.device("cpu"))
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(rec["student"]["model"], dtype=torch.bfloat16)
    assert shape.n_params == sum(p.numel() for p in real.parameters())
    assert shape.weight_bytes == sum(t.numel() * t.element_size() for t in [*real.parameters(), *real.buffers()])
    a = shape.arch
    assert shape.kv_bytes(3, 10) == 2 * a.n_layers * a.n_kv_heads * a.head_dim * 3 * 10 * 2


@pytest.mark.parametrize("method", [{"name": "lora"}, {"name": "seeking", "n_seed": 2}, {"name": "kd"}])
def test_the_plan_has_the_stages_a_run_records(tiny_recipe, method):
    from pktransfer.pipeline import run

    recipe = recipe_from_dict(dict(tiny_recipe, method=method))
    plan = make_plan(recipe, "cpu")
    recorded = run(recipe, quiet=True).run["stages"]
    planned = [s.name for s in plan.stages]
    assert set(planned) <= set(recorded), (planned, list(recorded))
    assert {"load_student", "eval_student", "train", "eval_trained"} <= set(planned)
    if method["name"] == "seeking":
        assert "sensitivity maps" in next(s for s in plan.stages if s.name == "prepare").terms
    assert all("peak_rss_gib" in s for s in recorded.values())
    d = plan.to_dict()
    assert d["peak_gib"] == max(v["peak_gib"] for v in d["stages"].values())


def test_a_run_that_does_not_fit_is_refused_naming_the_stage_and_the_shortfall(tiny_recipe):
    recipe = recipe_from_dict(tiny_recipe)
    plan = Plan(recipe, torch.device("cuda"), [Stage("load_student", {"w": 2 * GIB}, 1.0),
                                               Stage("train", {"w": 2 * GIB, "step": 3 * GIB}, 1.0)], None, None)  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(RecipeError) as err:
        check_fits(plan, 4 * GIB)
    assert "train: 5.0 GiB" in err.value.message and "by 1.0 GiB" in err.value.message
    check_fits(plan, 6 * GIB)  # fits: nothing raised
    # an evaluation at batch_size auto lowers its batch until it fits: not held against the device
    plan.stages.append(Stage("eval_trained", {"w": 9 * GIB}, 1.0, adaptive=True))
    check_fits(plan, 6 * GIB)


def test_pkt_plan_prints_the_stages_and_json(tiny_recipe, tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(dict(tiny_recipe, method={"name": "kd"})))
    res = CliRunner().invoke(app, ["plan", str(path)])
    assert res.exit_code == 0, res.output
    assert "load_teacher" in res.output and "train" in res.output and "the peak" in res.output
    res = CliRunner().invoke(app, ["plan", str(path), "--json"])
    data = json.loads(res.output)
    assert set(data["stages"]) >= {"load_teacher", "eval_teacher", "prepare", "train", "eval_trained"}
    res = CliRunner().invoke(app, ["plan", str(path), "--device", "tpu"])
    assert res.exit_code == 2 and "--device" in res.output
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_on_a_gpu_seekings_pass_holds_no_student_weights(tiny_recipe):
    recipe = recipe_from_dict(dict(tiny_recipe, method={"name": "seeking", "n_seed": 2}))
    prep = {d: next(s for s in make_plan(recipe, d).stages if s.name == "prepare") for d in ("cpu", "cuda")}
    assert "student weights" in prep["cpu"].terms
    assert "student weights" not in prep["cuda"].terms and "sensitivity maps" in prep["cuda"].terms


def test_parked_moves_a_gpu_model_to_the_cpu_and_back(monkeypatch):
    from pktransfer.ops import offload

    moves: list[str] = []

    class Model:
        hf_device_map = None

        def to(self, device):
            moves.append(str(device))

    monkeypatch.setattr(offload, "input_device", lambda m: torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with offload.parked(Model()):
        assert moves == ["cpu"]
    assert moves == ["cpu", "cuda:0"]
    moves.clear()
    monkeypatch.setattr(offload, "input_device", lambda m: torch.device("cpu"))
    with offload.parked(Model()):
        pass
    assert moves == []  # a CPU model stays where it is


def test_a_checkpointed_backward_is_planned_smaller_and_seekings_pass_uses_it(tiny_recipe):
    from pktransfer.plan import Batch, forward_peak, make_plan, model_shape

    recipe = recipe_from_dict(tiny_recipe)
    shape = model_shape(recipe.teacher, "teacher", torch.device("cpu"))
    batch = Batch(2, 64, 64)
    full = forward_peak(shape, batch, logits="all", backward=True)
    ckpt = forward_peak(shape, batch, logits="all", backward=True, checkpointing=True)
    assert 0 < ckpt < full
    assert forward_peak(shape, batch, logits="all", checkpointing=True) == forward_peak(shape, batch, logits="all")

    def backward_term(checkpointing: bool) -> int:
        rec = dict(tiny_recipe, method={"name": "seeking", "n_seed": 3, "gradient_checkpointing": checkpointing})
        (prepare,) = [s for s in make_plan(recipe_from_dict(rec), "cuda").stages if s.name == "prepare"]
        return prepare.terms["teacher backward (traced) and one weight's gradient"]

    assert backward_term(True) < backward_term(False)


def test_seekings_prepare_counts_the_maps_it_keeps_and_the_extraction_beside_them(tiny_recipe):
    """Hand-checked on the tiny pair (teacher hidden 64, 4 layers, k/v 32 rows, FFN 128; student hidden 32, 2
    layers, k/v 16, FFN 64): float32 maps for the 2 layers selection keeps, of every projection (36,864 weights a
    teacher layer), none for the embeddings (they keep column sums); on CPU the extraction beside them: a float32
    student-shaped matrix per LoRA target of both student layers (9,216 weights a layer), the SVD of the largest
    (3 x its 2,048 weights), and the submatrix search's float64 window sums over gate's 128 x 64 map for 64 x 32
    (2 x 8 x 33 x 129)."""
    from pktransfer.plan import Batch, model_shape, seeking_working_sets

    rec = dict(tiny_recipe, method={"name": "seeking", "n_seed": 2})
    prep = {d: next(s for s in make_plan(recipe_from_dict(rec), d).stages if s.name == "prepare") for d in ("cpu", "cuda")}
    assert prep["cpu"].terms["sensitivity maps"] == 4 * 2 * 36864
    assert not any("embeddings" in k for k in prep["cpu"].terms)
    recipe = recipe_from_dict(rec)
    cpu = torch.device("cpu")
    teacher, student = model_shape(recipe.teacher, "teacher", cpu), model_shape(recipe.student, "student", cpu)
    _pass, extraction = seeking_working_sets(recipe, teacher, student, Batch(1, 64, 8), 2, cpu)
    assert extraction == 4 * 2 * 9216 + 3 * 4 * 2048 + 2 * 8 * 33 * 129
    # CPU: the larger of the pass and the extraction beside the maps (the tiny untied head's streamed gradients are
    # the larger here); a GPU holds the maps and the pass (the extraction runs in CPU memory)
    for d in ("cpu", "cuda"):
        assert list(prep[d].terms)[-1] == "teacher backward (traced) and one weight's gradient"
    assert prep["cpu"].peak - sum(v for k, v in prep["cpu"].terms.items() if "weights" in k or "maps" in k) >= extraction
    # a reduced structure keeps no per-element maps
    rec = dict(tiny_recipe, method={"name": "seeking", "n_seed": 2, "structure": "row_column"})
    (reduced,) = [s for s in make_plan(recipe_from_dict(rec), "cpu").stages if s.name == "prepare"]
    assert reduced.terms["sensitivity maps"] == 0


def test_semaligns_training_is_planned_with_its_own_lora_on_the_paired_layers(tiny_recipe):
    """SemAlign trains LoRA on its four targets (up, down, v, o) of the paired layers only: the critical layers are
    chosen from data, so the plan puts them at the shallowest student layers (the longest backward)."""
    from pktransfer.plan import trained_lora

    lora = recipe_from_dict(tiny_recipe)
    semalign = recipe_from_dict(dict(tiny_recipe, method={"name": "semalign", "n_seed": 2, "critical_layers": 1}))
    plans = {r.method.name: make_plan(r, "cpu") for r in (lora, semalign)}
    train = {k: next(s for s in p.stages if s.name == "train") for k, p in plans.items()}
    # LoRA r 4 on the student's 2 layers: all seven projections (r x (in + out) each) against v/o/up/down of one layer
    per_layer = {"q": 4 * 64, "k": 4 * 48, "v": 4 * 48, "o": 4 * 64, "gate": 4 * 96, "up": 4 * 96, "down": 4 * 96}
    assert train["lora"].terms["LoRA weights"] == 2 * 4 * sum(per_layer.values())
    assert train["semalign"].terms["LoRA weights"] == 4 * sum(per_layer[r] for r in ("v", "o", "up", "down"))
    assert train["semalign"].terms["training step (traced)"] < train["lora"].terms["training step (traced)"]
    recipe, layers, note = trained_lora(semalign, None, _student(semalign))
    assert layers == [0] and recipe.lora.target_modules == ["up_proj", "down_proj", "v_proj", "o_proj"]
    assert "shallowest" in note and any("shallowest" in n for n in plans["semalign"].notes)
    assert trained_lora(lora, None, _student(lora)) == (lora, None, "")


def _student(recipe):
    from pktransfer.plan import model_shape

    return model_shape(recipe.student, "student", torch.device("cpu"))
