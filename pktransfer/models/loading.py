"""Loading causal LMs by ``builtin:NAME``, local folder, or hub id, with dtype and device."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pktransfer.errors import ModelError
from pktransfer.memory import release_memory
from pktransfer.models.arch import ArchitectureDescription, check_family, describe
from pktransfer.models.builtin import BUILTIN_PREFIX, get_builtin, is_prepared, part_files, prepare_builtin
from pktransfer.ops.offload import input_device

if TYPE_CHECKING:
    from pktransfer.config import ModelSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    source: str
    model: Any
    tokenizer: Any
    arch: ArchitectureDescription
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    weights_sha256: str | None = None  # of a local folder's weight files (None for a hub id: its revision says it)

    def unload(self) -> None:
        """Drop the weights so their memory can be returned."""
        self.model = None
        release_memory()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no CUDA GPU is available", hint="set device: cpu (or auto)")
    return torch.device(name)


def cpu_bf16_units() -> list[str]:
    """The CPU's native bfloat16 units (Linux /proc/cpuinfo flags ``amx_bf16``, ``avx512_bf16``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs that have it (else float16); on a CPU, bfloat16 where it computes bf16 natively
    (AMX or AVX512-BF16: a bf16 matmul of the offline student's shapes ran 5-6x faster than fp32 there) and float32
    elsewhere (emulated bf16 is slower than fp32). ``$PKT_CPU_AUTO_DTYPE`` (float32 / bfloat16) overrides the CPU
    choice."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        forced = os.environ.get("PKT_CPU_AUTO_DTYPE")
        if forced:
            if forced not in ("float32", "bfloat16"):
                raise ModelError(f"PKT_CPU_AUTO_DTYPE={forced!r}", hint="set it to float32 or bfloat16, or unset it")
            return _DTYPES[forced]
        return torch.bfloat16 if cpu_bf16_units() else torch.float32
    return _DTYPES[name]


def dtype_choice(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """What ``dtype: auto`` picked and why, for the log and run.json."""
    if name != "auto":
        return str(dtype).removeprefix("torch.")
    picked = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        return f"{picked} (auto: GPU)"
    if os.environ.get("PKT_CPU_AUTO_DTYPE"):
        return f"{picked} (auto: PKT_CPU_AUTO_DTYPE)"
    units = cpu_bf16_units()
    return f"{picked} (auto: this CPU has {' and '.join(units)})" if units else f"{picked} (auto: no native bf16 on this CPU)"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def resolve_source(name: str, log: Callable[[str], None] | None = None, prepare: bool = True) -> str:
    """A loadable location for ``name``: a local folder path or a hub id."""
    if name.startswith(BUILTIN_PREFIX):
        if prepare:
            return str(prepare_builtin(name, log=log))
        get_builtin(name)
        if not is_prepared(name):
            part_files(get_builtin(name))  # raises a clear error when the extra is missing
        return name
    if _looks_like_path(name):
        p = Path(name).expanduser()
        if not p.is_dir():
            raise ModelError(f"model folder '{p}' does not exist", hint="pass an existing folder, a hub id, or builtin:NAME")
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder '{p}' has no config.json", hint="point at a folder written by save_pretrained")
        return str(p)
    return name


def load_config(name: str, revision: str | None = None) -> Any:
    """Load and check a model's config without its weights (fails fast on unknown or unsupported models)."""
    from transformers import AutoConfig

    source = resolve_source(name, prepare=False)
    if source.startswith(BUILTIN_PREFIX):
        return None  # prepared lazily; the builtin models are known to be qwen2
    if Path(source).is_dir():
        check_weight_files(Path(source), name)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model '{name}' could not be found: it is not a local folder and the hub did not provide it ({_first_line(err)})",
            hint="check the spelling, pass a local folder, use builtin:qwen2.5-coder-0.5b-instruct, or go online",
        ) from None
    check_family(config, repr(name))
    return config


def check_weight_files(folder: Path, name: str) -> None:
    """Read the header of every safetensors file in a local model folder (cheap): a truncated or corrupt
    file fails here, before any work starts, instead of deep inside from_pretrained."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = list(sf.keys())
                if keys:
                    sf.get_slice(keys[-1])
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise ModelError(
                f"model '{name}': weight file '{f}' is truncated or corrupt ({_first_line(err)})",
                hint="re-save or re-download the model folder",
            ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _max_memory(caps: dict[int | str, str] | None) -> dict[int | str, str] | None:
    """YAML keys '0', '1' mean GPU indices; 'cpu' and 'disk' stay names."""
    if caps is None:
        return None
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in caps.items()}


def _placement_summary(model: Any) -> str:
    """'cpu: 12 modules, disk: 4 modules' from accelerate's device map."""
    counts: dict[str, int] = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    return ", ".join(f"{d}: {n} module{'s' if n > 1 else ''}" for d, n in counts.items()) or "one device"


def load_model(spec: ModelSpec, log: Callable[[str], None] | None = None) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # pktransfer reports loading itself
    if log:
        log(f"loading {spec.model}")
    t0 = time.perf_counter()
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    config = load_config(spec.model, spec.revision)
    source = resolve_source(spec.model, log=log)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        check_family(config, repr(spec.model))
    placement: dict[str, Any] = {}
    if spec.device_map is not None:  # sharded through accelerate: each module on its device, the rest offloaded
        placement = {"device_map": spec.device_map, "max_memory": _max_memory(spec.max_memory)}
        if spec.offload_folder:
            placement["offload_folder"] = str(Path(spec.offload_folder).expanduser())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=spec.revision, dtype=dtype, **placement)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelError(
            f"model '{spec.model}' could not be loaded from '{source}': {_first_line(err)}",
            hint="the folder may be incomplete or corrupt; re-save it or re-prepare the builtin model "
            "(pkt models prepare NAME --force)",
        ) from None
    if spec.device_map is None:
        model.to(device)
    else:
        device = input_device(model)
        if log:
            log(f"sharded {spec.model}: {_placement_summary(model)}")
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    arch = describe(model)
    if log:
        picked = dtype_choice(spec.dtype, device, dtype)
        log(f"loaded {spec.model} in {time.perf_counter() - t0:.1f}s ({picked}): {arch.summary()}")
    digest = weights_sha256(Path(source)) if Path(source).is_dir() else None
    return LoadedModel(spec.model, source, model, tokenizer, arch, device, dtype, time.perf_counter() - t0, digest)


def adapter_sha256(adapter: str | Path | None) -> str | None:
    """SHA-256 of a PEFT adapter folder's weights file (``adapter_model.safetensors``, else ``.bin``); None when there
    is none: what a teacher's delta is (a cache made from another adapter at the same path is not reused)."""
    import hashlib

    if adapter is None:
        return None
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = Path(adapter).expanduser() / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            return digest.hexdigest()
    return None


WEIGHTS_DIGEST = ".pktransfer-weights.json"  # beside a model's weight files: their sha256, keyed by size and mtime


def weights_sha256(folder: Path) -> str:
    """SHA-256 over a model folder's weight files (``*.safetensors``, ``*.bin``, by name): what the weights a run read
    were, e.g. the offline pair's dequantised GGUF or a planted teacher. Hashed once and kept beside the files with
    their sizes and modification times (recomputed when any changed); a read-only folder is hashed on every load."""
    import hashlib
    import json as _json

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = folder / WEIGHTS_DIGEST
    try:
        kept = _json.loads(cache.read_text())
        if kept.get("files") == stamp:
            return str(kept["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    digest = h.hexdigest()
    try:
        from pktransfer.fileio import write_text

        write_text(cache, _json.dumps({"files": stamp, "sha256": digest}))
    except OSError:
        pass
    return digest
