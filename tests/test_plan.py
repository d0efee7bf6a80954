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
        (prepare,) = [s for s in make_plan(recipe_from_dict(rec), "cpu").stages if s.name == "prepare"]
        return prepare.terms["teacher backward (traced)"]

    assert backward_term(True) < backward_term(False)
