"""dtype: auto picks bfloat16 on a CPU with native bf16 units, float32 elsewhere, and says which."""

from __future__ import annotations

import pytest
import torch

import pktransfer.models.loading as loading
from pktransfer.errors import ModelError

CPU = torch.device("cpu")


def test_auto_on_a_cpu_follows_its_bf16_units(monkeypatch):
    monkeypatch.delenv("PKT_CPU_AUTO_DTYPE", raising=False)
    monkeypatch.setattr(loading, "cpu_bf16_units", lambda: ["amx_bf16", "avx512_bf16"])
    assert loading.resolve_dtype("auto", CPU) == torch.bfloat16
    assert loading.dtype_choice("auto", CPU, torch.bfloat16) == "bfloat16 (auto: this CPU has amx_bf16 and avx512_bf16)"
    monkeypatch.setattr(loading, "cpu_bf16_units", lambda: [])
    assert loading.resolve_dtype("auto", CPU) == torch.float32
    assert "no native bf16" in loading.dtype_choice("auto", CPU, torch.float32)
    assert loading.resolve_dtype("float32", CPU) == torch.float32  # an explicit dtype is never changed


def test_the_override_and_a_bad_override(monkeypatch):
    monkeypatch.setattr(loading, "cpu_bf16_units", lambda: ["amx_bf16"])
    monkeypatch.setenv("PKT_CPU_AUTO_DTYPE", "float32")
    assert loading.resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setenv("PKT_CPU_AUTO_DTYPE", "half")
    with pytest.raises(ModelError, match="PKT_CPU_AUTO_DTYPE"):
        loading.resolve_dtype("auto", CPU)


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    real = loading.Path

    monkeypatch.setattr(loading, "Path", lambda p: real(info) if p == "/proc/cpuinfo" else real(p))
    assert loading.cpu_bf16_units() == ["avx512_bf16"]
