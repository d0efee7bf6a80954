"""Output folders never destroy what is not ours nor silently reuse what no longer matches; bad input gets
one clear error (exit status 2, no traceback) before anything starts."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import pktransfer
from pktransfer.cli import app
from pktransfer.errors import OutputError, PktError
from pktransfer.recipe import recipe_from_dict
from pktransfer.runs import MARKER, RunDir

runner = CliRunner()


def _cli(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in text, text
    return result.exit_code, text


def _write(tmp_path: Path, data: dict, name: str = "recipe.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _quick(recipe: dict) -> dict:
    recipe["evaluation"] = {"teacher": False, "student": False, "max_new_tokens": 2, "batch_size": 4}
    recipe["training"]["max_steps"] = 2
    return recipe


# ---- --overwrite only replaces what pktransfer wrote ---------------------------------------------------


def test_overwrite_refuses_a_folder_pktransfer_did_not_write(tiny_recipe, tmp_path):
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / "documents" / "thesis.tex").write_text("years of work")
    tiny_recipe["output_dir"] = str(home)
    code, text = _cli(["run", _write(tmp_path, _quick(tiny_recipe)), "-q", "--overwrite"])
    assert code == 2 and "not written by pktransfer" in text
    assert (home / "documents" / "thesis.tex").read_text() == "years of work"
    assert not home.with_name("home.partial").exists()  # refused before any work started


def test_overwrite_replaces_a_finished_run(tiny_recipe):
    recipe = recipe_from_dict(_quick(tiny_recipe))
    first = pktransfer.run(recipe, quiet=True).output_dir
    assert (first / MARKER).is_file()
    (first / "extra.txt").write_text("from the first run")
    again = pktransfer.run(recipe, quiet=True, overwrite=True).output_dir
    assert again == first and not (again / "extra.txt").exists()


def test_compare_overwrite_refuses_a_foreign_folder(tiny_recipe, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    data = _quick(tiny_recipe)
    data.update(output_dir=str(target), compare={"methods": ["lora"], "seeds": [0]})
    code, text = _cli(["compare", _write(tmp_path, data), "-q", "--overwrite"])
    assert code == 2 and "not written by pktransfer" in text and (target / "notes.txt").read_text() == "keep me"
    code, text = _cli(["compare", _write(tmp_path, data), "-q"])  # without --overwrite it is refused too
    assert code == 2 and (target / "notes.txt").is_file()


def test_a_file_as_output_folder_is_refused(tiny_recipe, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    tiny_recipe["output_dir"] = str(f)
    with pytest.raises(OutputError):
        pktransfer.run(recipe_from_dict(_quick(tiny_recipe)), quiet=True, overwrite=True)
    assert f.read_text() == "x"


# ---- resume only what matches ---------------------------------------------------------------------------


def test_an_unfinished_run_resumes_only_with_the_same_recipe(tiny_recipe, monkeypatch):
    import pktransfer.pipeline as pipeline

    recipe = recipe_from_dict(_quick(tiny_recipe))

    def boom(*a, **k):
        raise RuntimeError("killed during training")

    monkeypatch.setattr(pipeline, "train", boom)
    with pytest.raises(RuntimeError):
        pktransfer.run(recipe, quiet=True)
    monkeypatch.undo()
    partial = Path(recipe.output_dir + ".partial")
    assert (partial / "FAILED.json").is_file() and (partial / MARKER).is_file()
    changed = recipe_from_dict({**_quick(tiny_recipe), "training": {**tiny_recipe["training"], "lr": 5e-4}})
    with pytest.raises(OutputError, match=r"different recipe \(training.lr: 0.001 -> 0.0005\)"):
        pktransfer.run(changed, quiet=True)
    # the same recipe resumes; --overwrite with the changed one starts afresh
    assert pktransfer.run(changed, quiet=True, overwrite=True).run["recipe"]["training"]["lr"] == 5e-4


def test_a_partial_folder_without_our_marker_is_not_resumed(tiny_recipe):
    recipe = recipe_from_dict(_quick(tiny_recipe))
    partial = Path(recipe.output_dir + ".partial")
    partial.mkdir(parents=True)
    (partial / "something.bin").write_text("not ours")
    with pytest.raises(OutputError, match="not written by pktransfer"):
        pktransfer.run(recipe, quiet=True)
    assert (partial / "something.bin").read_text() == "not ours"


def test_compare_base_and_cells_are_reused_only_for_the_same_recipe(tiny_recipe, tmp_path):
    data = _quick(tiny_recipe)
    data["evaluation"]["student"] = True
    data.update(output_dir=str(tmp_path / "grid"), compare={"methods": ["lora"], "seeds": [0]})
    pktransfer.compare(recipe_from_dict(data), quiet=True)
    data["evaluation"]["max_new_tokens"] = 3  # changes the base evaluation and the cell
    with pytest.raises(OutputError, match="different recipe"):
        pktransfer.compare(recipe_from_dict(data), quiet=True)


def test_a_grid_cell_is_not_reused_once_its_model_folder_holds_other_weights(tiny_recipe, tmp_path):
    """The recipe names a local folder; saved again with other weights (a teacher planted again on another machine),
    the same recipe must not pick up the cells made with the old ones."""
    from safetensors.torch import load_file, save_file

    student = tmp_path / "student"
    shutil.copytree(tiny_recipe["student"]["model"], student)
    data = _quick(tiny_recipe)
    data["student"]["model"] = str(student)
    data.update(output_dir=str(tmp_path / "grid"), compare={"methods": ["lora"], "seeds": [0]})
    pktransfer.compare(recipe_from_dict(data), quiet=True)
    pktransfer.compare(recipe_from_dict(data), quiet=True)  # the same weights: reused
    weights = student / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(OutputError, match=r"(?s)other student weights than '.*student' holds now .*new output and records"):
        pktransfer.compare(recipe_from_dict(data), quiet=True)


def test_output_dir_is_not_a_result_field(tiny_recipe, tmp_path):
    recipe = recipe_from_dict(_quick(tiny_recipe))
    rd = RunDir(recipe.output_dir, recipe=recipe.dump())
    moved = recipe.model_copy(update={"output_dir": recipe.output_dir})
    assert RunDir(moved.output_dir, recipe={**moved.dump(), "compare": None}).resumed
    shutil.rmtree(rd.work)


# ---- atomic writes -------------------------------------------------------------------------------------


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from pktransfer.fileio import write_json

    path = write_json(tmp_path / "summary.json", {"accuracy": 0.5})

    class Boom(Exception):
        pass

    def explode(_tmp):
        raise Boom

    from pktransfer.fileio import atomic_write

    with pytest.raises(Boom):
        atomic_write(path, explode)
    assert json.loads(path.read_text()) == {"accuracy": 0.5} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_disk_full_gives_a_clear_error(tmp_path, monkeypatch):
    from pktransfer.fileio import write_text

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match="No space left on device") as err:
        write_text(tmp_path / "x.json", "{}")
    assert "free disk space" in err.value.hint and list(tmp_path.iterdir()) == []


def test_disk_full_during_a_run_ends_with_failed_json_and_a_message(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.fileio as fileio

    real = fileio.write_json

    def full_on_report(path, data, indent=1):
        if Path(path).name == "run.json":
            raise OutputError(f"could not write '{path}': No space left on device", hint="free disk space")
        return real(path, data, indent)

    monkeypatch.setattr(fileio, "write_json", full_on_report)
    tiny_recipe["output_dir"] = str(tmp_path / "full")
    code, text = _cli(["run", _write(tmp_path, _quick(tiny_recipe)), "-q"])
    assert code == 2 and "No space left on device" in text
    assert not (tmp_path / "full").exists() and (tmp_path / "full.partial" / "FAILED.json").is_file()


def test_a_truncated_cached_tensor_file_is_recomputed(tmp_path):
    import torch

    from pktransfer.methods.teacher_cache import cached_file
    from pktransfer.progress import Progress

    path = cached_file(tmp_path, "kd", "k", lambda: {"x": torch.ones(1000)}, Progress(quiet=True))
    path.write_bytes(path.read_bytes()[:200])  # an interrupted save of an older version
    again = cached_file(tmp_path, "kd", "k", lambda: {"x": torch.ones(1000)}, Progress(quiet=True))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(again))["x"], torch.ones(1000))


# ---- bad input: one clear error, exit status 2, nothing started ---------------------------------------


def test_an_empty_recipe_file_is_refused(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("\n  \n")
    code, text = _cli(["run", str(p), "-q", "-o", str(tmp_path / "out")])
    assert code == 2 and "is empty" in text and not (tmp_path / "out.partial").exists()


def test_a_non_utf8_recipe_is_refused(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("seed: 0\n# caf\xe9\n".encode("latin-1"))
    code, text = _cli(["recipe", str(p)])
    assert code == 2 and "not UTF-8" in text


@pytest.mark.parametrize("where", ["/proc/pkt-test/out", "FILE/out"])
def test_an_output_folder_that_cannot_be_created(tiny_recipe, tmp_path, where):
    f = tmp_path / "FILE"
    f.write_text("x")
    tiny_recipe["output_dir"] = where.replace("FILE", str(f))
    code, text = _cli(["run", _write(tmp_path, _quick(tiny_recipe)), "-q"])
    assert code == 2 and "cannot create the output folder" in text


def test_a_truncated_model_file_is_named(tiny_models, tiny_recipe, tmp_path):
    broken = tmp_path / "broken_teacher"
    shutil.copytree(tiny_models["qwen2_teacher"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    tiny_recipe["teacher"]["model"] = str(broken)
    tiny_recipe["output_dir"] = str(tmp_path / "out")
    code, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q"])
    assert code == 2 and "truncated or corrupt" in text and "model.safetensors" in text
    assert not (tmp_path / "out.partial").exists()


def test_training_rows_without_a_response_are_refused(tiny_recipe, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "reference": ""}) + "\n" for i in range(4)))
    tiny_recipe["task"] = {"name": "jsonl", "params": {"train": str(data), "test": str(data)}}
    tiny_recipe["output_dir"] = str(tmp_path / "out")
    code, text = _cli(["run", _write(tmp_path, tiny_recipe), "-q"])
    assert code == 2 and "no response" in text and not (tmp_path / "out.partial").exists()


def test_non_utf8_data_and_bad_messages_are_named(tiny_recipe, tmp_path):
    from pktransfer.data import get_task
    from pktransfer.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        get_task("jsonl", {"train": str(bad)}).split("train")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": "hello"}) + "\n")
    with pytest.raises(DataError, match="'messages' must be a list"):
        get_task("jsonl", {"train": str(rows)}).split("train")


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_eval_limit_must_be_positive(tiny_models, limit):
    code, text = _cli(["eval", "-m", str(tiny_models["qwen2_student"]), "-t", "arithmetic", "--limit", limit, "-q"])
    assert code == 2 and "limit" in text and "positive integer" in text


def test_eval_batch_size_zero_in_a_recipe(tiny_recipe, tmp_path):
    tiny_recipe["evaluation"]["batch_size"] = 0
    code, text = _cli(["recipe", _write(tmp_path, tiny_recipe)])
    assert code == 2 and "evaluation.batch_size" in text


def test_pkt_cache_pointing_at_a_file(tmp_path, monkeypatch):
    f = tmp_path / "cache-file"
    f.write_text("x")
    monkeypatch.setenv("PKT_CACHE", str(f))
    code, text = _cli(["models", "prepare", "qwen2.5-coder-0.5b-instruct"])
    assert code == 2 and "PKT_CACHE" in text and "is a file" in text


def test_permission_denied_on_save_is_a_clear_error(tiny_recipe, tmp_path, monkeypatch):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: give the error the kernel gives a plain user
        real_mkdir = Path.mkdir

        def denied(self, *a, **k):
            if str(self).startswith(str(ro) + os.sep):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", denied)
    tiny_recipe["output_dir"] = str(ro / "out")
    code, text = _cli(["run", _write(tmp_path, _quick(tiny_recipe)), "-q"])
    assert code == 2 and ("not writable" in text or "Permission denied" in text)
    ro.chmod(0o755)


def test_an_os_error_from_a_library_save_is_a_clear_message(monkeypatch):
    from pktransfer.cli import guarded

    def save():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/merged/model.safetensors")

    import typer

    with pytest.raises(typer.Exit) as exit_:
        guarded(save)
    assert exit_.value.exit_code == 2


def test_every_cli_error_path_is_a_pkt_error():
    """Every `except` in the CLI re-raises or handles a known type; nothing else is swallowed or leaks."""
    import ast
    import inspect

    import pktransfer.cli as cli

    tree = ast.parse(inspect.getsource(cli))
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            assert node.type is not None, f"bare except at line {node.lineno}"
            names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)} | {
                n.attr for n in ast.walk(node.type) if isinstance(n, ast.Attribute)
            }
            assert names and "Exception" not in names and "BaseException" not in names, node.lineno
    assert issubclass(OutputError, PktError)


def test_a_run_recorded_before_a_field_existed_still_matches_and_a_real_change_does_not(tiny_recipe, tmp_path):
    """Upgrading pktransfer adds recipe fields at their defaults: a finished run must stay reusable."""
    from pktransfer.recipe import recipe_from_dict
    from pktransfer.runs import check_matches, result_fields, write_marker

    fields = result_fields(recipe_from_dict(tiny_recipe).dump())
    old = json.loads(json.dumps(fields))
    del old["task"]["validation"]  # as recorded by a version without task.validation
    folder = tmp_path / "old-run"
    folder.mkdir()
    write_marker(folder, "run", old)
    check_matches(folder, fields, "finished run")  # no error
    changed = json.loads(json.dumps(fields))
    changed["training"]["lr"] = 0.5
    with pytest.raises(OutputError, match=r"training\.lr"):
        check_matches(folder, changed, "finished run")
