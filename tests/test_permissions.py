"""Everything pktransfer writes honours the process umask (a team on a shared filesystem can read results)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import pktransfer
from pktransfer.fileio import atomic_dir, process_umask, save_safetensors, torch_save, write_json
from pktransfer.recipe import recipe_from_dict


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_umask_modes(tmp_path, umask_022):
    assert process_umask() == 0o022
    assert _mode(write_json(tmp_path / "a.json", {"x": 1})) == 0o644
    assert _mode(save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")) == 0o644
    assert _mode(torch_save({"x": 1}, tmp_path / "t.pt")) == 0o644
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "f.txt").write_text("x")
    assert _mode(tmp_path / "folder") == 0o755 and _mode(tmp_path / "folder" / "f.txt") == 0o644
    os.umask(0o077)
    assert _mode(write_json(tmp_path / "private.json", {})) == 0o600  # a stricter umask is honoured too


def test_every_file_and_folder_of_a_run_is_readable_by_the_team(tiny_recipe, umask_022):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(recipe_from_dict({**tiny_recipe, "method": {"name": "kd"}}), quiet=True, evaluate=False)
    paths = [res.output_dir, *res.output_dir.rglob("*")]
    assert len(paths) > 10
    wrong = {str(p.relative_to(res.output_dir)): oct(_mode(p)) for p in paths if _mode(p) != (0o755 if p.is_dir() else 0o644)}
    assert not wrong, wrong
