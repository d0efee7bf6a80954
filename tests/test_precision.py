"""evaluation.dtype: models are scored in one dtype, parameters cast and given back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pktransfer
from pktransfer.models.precision import cast_params, params_dtype, scored_in
from pktransfer.recipe import recipe_from_dict


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("inv_freq", torch.tensor([1.0, 1e-4, 1.2345678]))


def test_cast_params_leaves_buffers_as_they_are():
    m = Tiny()
    cast_params(m, torch.bfloat16)
    assert m.lin.weight.dtype == torch.bfloat16 and m.inv_freq.dtype == torch.float32
    assert params_dtype(m) == torch.bfloat16


@pytest.mark.parametrize(
    ("start", "inside"),
    [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)],
)
def test_scored_in_gives_every_parameter_back_exactly(start, inside):
    m = Tiny()
    with torch.no_grad():
        m.lin.weight[0, 0] = 1e-9  # below float16's smallest subnormal: a plain round trip through float16 loses it
        m.lin.weight[0, 1] = 1.0 + 2**-20  # between bfloat16 values: a round trip through bfloat16 loses it
    cast_params(m, start)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with scored_in(m, inside):
        assert params_dtype(m) == inside
    after = m.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_scored_in_without_restore_leaves_the_cast():
    m = Tiny()
    with scored_in(m, torch.float16, restore=False):
        pass
    assert params_dtype(m) == torch.float16


def _summaries(out):
    return {p.name.split(".")[0]: json.loads(p.read_text()) for p in (out / "eval").glob("*.summary.json")}


def test_a_laten_student_is_scored_in_the_untouched_students_dtype(tiny_recipe):
    """LaTen works in float32 on a bfloat16 student; auto scores before and after alike, in bfloat16."""
    tiny_recipe["student"]["dtype"] = "bfloat16"
    tiny_recipe["evaluation"]["teacher"] = False
    base = {
        **tiny_recipe,
        "task": {**tiny_recipe["task"], "params": {"sizes": {"test": 6, "train": 16, "seed": 4, "extract": 3, "align": 24}}},
    }
    res = pktransfer.run(recipe_from_dict({**base, "method": {"name": "laten", "n_val": 6, "checkpoint": 0}}), quiet=True)
    got = _summaries(res.output_dir)
    assert got["student"]["dtype"] == got["trained"]["dtype"] == "bfloat16"
    base["evaluation"] = {**base["evaluation"], "dtype": "as-is"}  # what LaTen's runs did before this field
    base["output_dir"] = str(Path(base["output_dir"]).with_name("as-is"))
    res = pktransfer.run(recipe_from_dict({**base, "method": {"name": "laten", "n_val": 6, "checkpoint": 0}}), quiet=True)
    got = _summaries(res.output_dir)
    assert (got["student"]["dtype"], got["trained"]["dtype"]) == ("bfloat16", "float32")


def test_an_evaluation_dtype_scores_every_model_in_it_and_training_starts_unchanged(tiny_recipe, tmp_path):
    tiny_recipe["student"]["dtype"] = "bfloat16"
    tiny_recipe["teacher"]["dtype"] = "bfloat16"
    plain = pktransfer.run(
        recipe_from_dict({**tiny_recipe, "evaluation": {**tiny_recipe["evaluation"], "teacher": False}}), quiet=True
    )
    tiny_recipe["evaluation"]["dtype"] = "float16"
    tiny_recipe["output_dir"] = str(tmp_path / "fp16")
    res = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    got = _summaries(res.output_dir)
    assert {s["dtype"] for s in got.values()} == {"float16"} and set(got) == {"teacher", "student", "trained"}
    # scoring the untouched student in float16 gave its bfloat16 weights back exactly: training is the same
    assert res.run["training"]["final_loss"] == plain.run["training"]["final_loss"]


def test_records_made_before_evaluation_dtype_read_as_what_they_computed():
    """Records made before the field read as-is (every model scored in the dtype it held: LaTen's trained student in
    float32); LaTen's records also ranked unrounded scores."""
    from pktransfer.runs import as_current_schema

    laten = as_current_schema({"method": {"name": "laten"}, "evaluation": {"splits": ["test"]}})
    lora = as_current_schema({"method": {"name": "lora"}, "evaluation": {"splits": ["test"]}})
    assert laten is not None and lora is not None
    assert laten["evaluation"]["dtype"] == "as-is" and laten["method"]["score_decimals"] is None
    assert lora["evaluation"]["dtype"] == "as-is" and "score_decimals" not in lora["method"]
    now = as_current_schema({"method": {"name": "laten"}, "evaluation": {"dtype": "auto"}})
    assert now is not None and now["evaluation"]["dtype"] == "auto"  # a recorded value is kept
