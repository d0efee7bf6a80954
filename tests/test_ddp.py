"""Data-parallel student training: `torchrun --nproc_per_node 2` (gloo, CPU) trains the same adapter as one
process with the same global batch (training.batch_size), and only process 0 writes the run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pktransfer
from pktransfer.recipe import recipe_from_dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


# every method that trains a student with the shared trainer (LaTen trains its hypernetworks itself: refused below).
# Deterministic ones must train the adapter one process trains; the samplers (gkd) draw other samples per process, so
# they must run to the same number of steps with a finite loss.
DETERMINISTIC = [
    {"name": "lora"},
    {"name": "pissa"},
    {"name": "kd"},
    {"name": "seeking", "n_seed": 3},
    {"name": "weight_selection"},
    {"name": "semalign", "critical_layers": "all", "output_loss": "kl"},
    {"name": "semalign", "version": "v2"},
    {"name": "hidden_kd"},
    {"name": "delta", "teacher_adapter": "TEACHER_ADAPTER"},
]
SAMPLING = [
    {"name": "gkd", "lmbda": 1.0},
    {"name": "compose", "start": {"name": "seeking", "n_seed": 3}, "objective": {"name": "gkd", "lmbda": 1.0}},
]


def _id(m: dict) -> str:
    if m["name"] == "compose":
        return f"{m['start']['name']}+{m['objective']['name']}"
    return m["name"] + ("-v2" if m.get("version") == "v2" else "")


def _torchrun(recipe: dict, folder, tmp_path) -> dict:
    path = tmp_path / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(folder)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={_free_port()}"]
    cmd += ["-m", "pktransfer.cli", "run", str(path), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load((folder / "run.json").read_text())


@pytest.mark.parametrize("method", DETERMINISTIC + SAMPLING, ids=[_id(m) for m in DETERMINISTIC + SAMPLING])
def test_every_student_training_method_runs_on_two_processes(tiny_recipe, tmp_path, method):
    if method.get("teacher_adapter") == "TEACHER_ADAPTER":
        from test_delta import _teacher_adapter

        adapter = _teacher_adapter(tiny_recipe["teacher"]["model"], tmp_path / "teacher-adapter")
        method = {**method, "teacher_adapter": str(adapter)}
    tiny_recipe["method"] = method
    tiny_recipe["training"].update(batch_size=4, max_steps=2, save_steps=2)
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    run = _torchrun(tiny_recipe, tmp_path / "two", tmp_path)
    assert run["training"]["steps"] == 2 and run["training"]["processes"] == 2
    assert run["training"]["final_loss"] is not None and run["training"]["final_loss"] == run["training"]["final_loss"]
    if method in DETERMINISTIC:
        one = pktransfer.run(recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "one")}), quiet=True)
        a, b = _adapter(one.output_dir), _adapter(tmp_path / "two")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("method", [{"name": "lora"}, {"name": "seeking", "n_seed": 3}], ids=["lora", "seeking"])
def test_two_processes_train_the_adapter_one_process_trains(tiny_recipe, tmp_path, method):
    tiny_recipe["method"] = method
    tiny_recipe["training"].update(batch_size=4, max_steps=4, save_steps=2)
    tiny_recipe["evaluation"]["teacher"] = False
    one = pktransfer.run(recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "one")}), quiet=True)

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe, "output_dir": str(tmp_path / "two")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={_free_port()}"]
    cmd += ["-m", "pktransfer.cli", "run", str(path), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    run = yaml.safe_load((two / "run.json").read_text())
    assert run["training"]["steps"] == 4 and run["metrics"]["trained"]["test"]["n"] == 6  # process 0 evaluated
    assert run["training"]["processes"] == 2 and one.run["training"]["processes"] == 1
    a, b = _adapter(one.output_dir), _adapter(two)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two"]  # no worker output


def test_an_uneven_global_batch_and_laten_are_refused(tiny_recipe, monkeypatch):
    from pktransfer.errors import RecipeError
    from pktransfer.pipeline import check_distributable
    from pktransfer.training import per_device_batch

    monkeypatch.setenv("WORLD_SIZE", "3")
    spec = recipe_from_dict(tiny_recipe).training
    with pytest.raises(RecipeError, match="does not split evenly over 3 processes"):
        per_device_batch(spec, 3)
    tiny_recipe["method"] = {"name": "laten"}
    with pytest.raises(RecipeError, match="cannot run on several processes"):
        check_distributable(recipe_from_dict(tiny_recipe))
    # a delta start that would train its teacher delta in every process is refused too, alone or composed
    for method in ({"name": "delta"}, {"name": "compose", "start": {"name": "delta"}, "objective": {"name": "kd"}}):
        tiny_recipe["method"] = method
        with pytest.raises(RecipeError, match="train the teacher's delta inside every process") as err:
            check_distributable(recipe_from_dict(tiny_recipe))
        assert "teacher_adapter" in err.value.hint


def test_fsdp_is_refused_with_one_clear_error(tiny_recipe, monkeypatch):
    """accelerate launch with an FSDP config sets ACCELERATE_USE_FSDP: refused before anything loads."""
    from pktransfer.errors import RecipeError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="FSDP student training is not supported yet") as err:
        pktransfer.run(recipe_from_dict(tiny_recipe), quiet=True)
    assert "accelerate-ddp.yaml" in err.value.hint
    assert not os.path.exists(tiny_recipe["output_dir"])  # nothing written
