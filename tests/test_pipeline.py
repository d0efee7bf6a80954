from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import pktransfer
from pktransfer.cli import app
from pktransfer.errors import DataError, ModelError
from pktransfer.recipe import recipe_from_dict

runner = CliRunner()


def test_run_end_to_end_writes_everything(tiny_recipe, tmp_path):
    res = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    out = res.output_dir
    assert out.is_dir() and not out.with_name(out.name + ".partial").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["seed"] == 0
    assert set(run["metrics"]) == {"teacher", "student", "trained"}
    for label in ("teacher", "student", "trained"):
        m = run["metrics"][label]["test"]
        assert m["n"] == 6 and 0 <= m["accuracy"] <= 1
        items = (out / "eval" / f"{label}.arithmetic.test.items.jsonl").read_text().splitlines()
        assert len(items) == 6 and {"prompt", "output", "extracted", "reference", "correct"} <= set(json.loads(items[0]))
    assert {"load_teacher", "eval_teacher", "load_student", "train", "eval_trained"} <= set(run["stages"])
    assert all(s["seconds"] >= 0 and s["peak_rss_anon_gib"] > 0 for s in run["stages"].values())
    assert run["versions"]["torch"] and run["training"]["steps"] == 4
    # the host too: a rerun elsewhere can differ in the CPU kernels' rounding, so a record names its CPU
    assert run["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "bf16 units:" in run["versions"]["cpu"] and run["versions"]["platform"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["seed"] == 0
    assert "| teacher |" in (out / "report.md").read_text()
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_existing_output_is_not_overwritten(tiny_recipe):
    tiny_recipe["evaluation"] = {"teacher": False, "student": False, "max_new_tokens": 2}
    pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    with pytest.raises(pktransfer.PktError, match="already exists"):
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True, overwrite=True)


def test_pissa_adapter_applies_to_the_unmodified_student(tiny_recipe, tiny_models):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_recipe["lora"]["init"] = "pissa"
    tiny_recipe["training"]["save_merged"] = True
    tiny_recipe["evaluation"] = {"teacher": False, "student": False, "max_new_tokens": 2}
    out = pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True).output_dir
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_student"]))
        adapted = PeftModel.from_pretrained(base, str(out / "adapter"))(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)


def test_failed_run_says_so_and_resumes(tiny_recipe, monkeypatch):
    import pktransfer.pipeline as pipeline

    calls = {"n": 0}
    real = pipeline.evaluate_items

    def flaky(*a, **kw):
        calls["n"] += 1
        if kw["label"] == "trained" and calls["n"] < 10:
            calls["n"] = 10
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "evaluate_items", flaky)
    recipe = recipe_from_dict(tiny_recipe)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pktransfer.run(recipe, quiet=True)
    final = Path(tiny_recipe["output_dir"]).resolve()
    partial_dir = final.with_name(final.name + ".partial")
    assert not final.exists()
    failed = json.loads((partial_dir / "FAILED.json").read_text())
    assert "simulated crash" in failed["error"]
    done_before = {p.name for p in (partial_dir / "eval").glob("*.summary.json")}
    assert done_before == {"teacher.arithmetic.test.summary.json", "student.arithmetic.test.summary.json"}
    res = pktransfer.run(recipe, quiet=True)  # resumes: finished evaluations and checkpoints are reused
    assert res.run["training"]["resumed_from"] is not None
    assert not partial_dir.exists() and (final / "run.json").is_file()


# ---- CLI: bad input gives one readable message, exit code 2, no traceback ----------------------


def _cli(args):
    result = runner.invoke(app, args)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in text
    return result, text


def test_an_error_naming_brackets_prints_them_as_is(tmp_path):
    # rich markup once dropped "[lr=0.0001]" from messages and tables, and failed on a closing "[/...]" in a path
    missing = tmp_path / "a[/b]" / "recipe[lr=1].yaml"
    result, text = _cli(["run", str(missing)])
    assert result.exit_code == 2 and "a[/b]" in text and "recipe[lr=1].yaml" in text and "error:" in text


def _write(tmp_path, data):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_cli_typo_in_recipe(tiny_recipe, tmp_path):
    tiny_recipe["trainig"] = tiny_recipe.pop("training")
    res, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q"])
    assert res.exit_code == 2 and "unknown field 'trainig'" in text and "did you mean 'training'" in text


def test_cli_unknown_model(tiny_recipe, tmp_path):
    tiny_recipe["student"]["model"] = str(tmp_path / "no-such-model")
    res, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q"])
    assert res.exit_code == 2 and "does not exist" in text
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_cli_unknown_hub_model_offline(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_recipe["student"]["model"] = "nobody/no-such-model-xyz"
    res, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q"])
    assert res.exit_code == 2 and "could not be found" in text


def test_cli_missing_data_folder(tiny_recipe, tmp_path):
    tiny_recipe["task"] = {"name": "gsm8k", "data_dir": str(tmp_path / "nowhere")}
    res, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q"])
    assert res.exit_code == 2 and "does not exist" in text and "data_dir" in text


def test_cli_incompatible_values(tiny_recipe, tmp_path):
    tiny_recipe["training"]["batch_size"] = 0
    res, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q"])
    assert res.exit_code == 2 and "training.batch_size" in text
    tiny_recipe["training"]["batch_size"] = 2
    tiny_recipe["lora"]["target_modules"] = ["attn_qkv"]
    res, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q"])
    assert res.exit_code == 2 and "attn_qkv" in text and "q_proj" in text


def test_cli_overrides_and_recipe_verb(tiny_recipe, tmp_path):
    res, text = _cli(["recipe", _write(tmp_path, tiny_recipe), "--set", "seed=5"])
    assert res.exit_code == 0 and "seed: 5" in text
    res, text = _cli(["run", _write(tmp_path, tiny_recipe), "--set", "training.lr=abc", "-q"])
    assert res.exit_code == 2 and "training.lr" in text


def test_cli_run_and_eval(tiny_recipe, tiny_models, tmp_path):
    res, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q", "-o", str(tmp_path / "cli_run")])
    assert res.exit_code == 0, text
    assert "student + method" in text
    res, text = _cli(
        [
            "eval",
            "-m",
            str(tiny_models["qwen2_student"]),
            "--adapter",
            str(tmp_path / "cli_run" / "adapter"),
            "--limit",
            "3",
            "--max-new-tokens",
            "2",
            "-q",
            "--output-dir",
            str(tmp_path / "ev"),
        ]
    )
    assert res.exit_code == 0, text
    assert (tmp_path / "ev" / "model.arithmetic.test.items.jsonl").is_file()
    res, text = _cli(["eval", "-m", str(tiny_models["qwen2_student"]), "--adapter", str(tmp_path), "-q"])
    assert res.exit_code == 2 and "adapter_config.json" in text


def test_cli_help_for_every_verb():
    for verb in (
        ["run"],
        ["train"],
        ["eval"],
        ["tasks"],
        ["recipe"],
        ["models", "list"],
        ["models", "prepare"],
        ["models", "describe"],
    ):
        res = runner.invoke(app, [*verb, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_api_errors_are_typed(tiny_recipe, tmp_path):
    tiny_recipe["student"]["model"] = str(tmp_path / "missing")
    with pytest.raises(ModelError):
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    tiny_recipe["task"] = {"name": "gsm8k", "data_dir": str(tmp_path)}
    with pytest.raises(DataError):
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)


def test_cli_listing_verbs(tiny_models):
    res, text = _cli(["tasks"])
    assert res.exit_code == 0 and "arithmetic" in text and "gsm8k" in text
    res, text = _cli(["models", "list"])
    assert res.exit_code == 0 and "builtin:qwen2.5-coder-1.5b-instruct" in text
    res, text = _cli(["models", "describe", str(tiny_models["llama_student"])])
    assert res.exit_code == 0 and "llama: 2 layers, hidden 32" in text
    res, text = _cli(["models", "describe", "builtin:nope"])
    assert res.exit_code == 2 and "unknown builtin model" in text
