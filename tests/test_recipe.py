from __future__ import annotations

import pytest

from pktransfer.errors import RecipeError
from pktransfer.recipe import Recipe, load_recipe, recipe_from_dict


def test_defaults_are_the_offline_pair_and_arithmetic():
    r = load_recipe()
    assert r.teacher.model == "builtin:qwen2.5-coder-1.5b-instruct"
    assert r.student.model == "builtin:qwen2.5-coder-0.5b-instruct"
    assert r.task.name == "arithmetic" and r.method.name == "lora"


def test_quickstart_recipe_validates():
    r = load_recipe("recipes/quickstart.yaml")
    assert r.output_dir == "runs/quickstart"


def test_unknown_key_is_rejected_with_suggestion():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"trainig": {"lr": 1e-4}})
    msg = str(e.value)
    assert "unknown field 'trainig'" in msg and "did you mean 'training'" in msg


def test_nested_unknown_key_names_allowed_fields():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"training": {"learning_rate": 1e-4}})
    msg = str(e.value)
    assert "training.learning_rate" in msg and "lr" in msg


def test_bad_value_names_field_value_and_allowed():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"lora": {"init": "magic"}})
    msg = str(e.value)
    assert "lora.init" in msg and "'magic'" in msg and "pissa" in msg
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"training": {"lr": -1}})
    assert "training.lr" in str(e.value) and "-1" in str(e.value)


def test_unknown_method_lists_methods():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"method": {"name": "magic"}})
    assert "method" in str(e.value) and "lora" in str(e.value)


def test_overrides_apply_and_are_validated():
    r = recipe_from_dict({}, overrides=["training.lr=1e-4", "seed=7", "evaluation.splits=[test, train]"])
    assert r.training.lr == 1e-4 and r.seed == 7 and r.evaluation.splits == ["test", "train"]
    with pytest.raises(RecipeError):
        recipe_from_dict({}, overrides=["training.batch_size=zero"])
    with pytest.raises(RecipeError):
        recipe_from_dict({}, overrides=["noequals"])


def test_same_teacher_and_student_is_refused():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"teacher": {"model": "x"}, "student": {"model": "x"}})
    assert "same model" in str(e.value)


def test_yaml_errors_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  model: [unclosed\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert "not valid YAML" in str(e.value) and "line" in str(e.value)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(lst)


def test_dump_round_trips():
    r = recipe_from_dict({"seed": 3, "lora": {"r": 8}})
    assert Recipe.model_validate(r.dump()) == r


def test_every_shipped_recipe_validates():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        load_recipe(str(f))
