"""Output folders that are never left half-written, plus run metadata (versions, timings, memory).

A run works in ``OUT.partial/`` and is renamed to ``OUT`` only when it finished. A failed run leaves
``OUT.partial/FAILED.json`` saying why; rerunning the same recipe resumes there (training restarts
from its last checkpoint). An existing finished ``OUT`` is never overwritten unless asked.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pktransfer.errors import PktError

FAILED = "FAILED.json"
RUN_JSON = "run.json"


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("pktransfer", "torch", "transformers", "peft", "accelerate", "safetensors", "pydantic", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import torch

        out["torch_threads"] = str(torch.get_num_threads())
        out["cuda"] = torch.version.cuda or "none"
    except ImportError:
        pass
    return out


def rss_anon_bytes() -> int:
    """Anonymous resident memory (excludes reclaimable file-backed pages such as mmapped safetensors)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryMonitor:
    """Samples anonymous RSS (and CUDA peak) in a background thread; reports a peak per stage."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_anon_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self._peak = rss_anon_bytes()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except ImportError:
            pass

    def peak(self) -> dict[str, float]:
        self._peak = max(self._peak, rss_anon_bytes())
        out = {"peak_rss_anon_gib": round(self._peak / 2**30, 3)}
        try:
            import torch

            if torch.cuda.is_available():
                out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        except ImportError:
            pass
        return out


@dataclass
class StageLog:
    monitor: MemoryMonitor
    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Any:
        self.monitor.reset()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = {"seconds": round(time.perf_counter() - t0, 2), **self.monitor.peak()}


class RunDir:
    """``OUT.partial`` while running; renamed to ``OUT`` by :meth:`finish`."""

    def __init__(self, output_dir: str | Path, overwrite: bool = False) -> None:
        self.final = Path(output_dir).expanduser().resolve()
        self.work = self.final.with_name(self.final.name + ".partial")
        if self.final.exists() and not overwrite:
            raise PktError(f"output folder '{self.final}' already holds a finished run",
                           hint="choose another output_dir (--output-dir) or pass --overwrite")
        self.overwrite = overwrite
        self.resumed = self.work.is_dir()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / FAILED).unlink(missing_ok=True)

    def path(self, *parts: str) -> Path:
        p = self.work.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, data: Any) -> Path:
        p = self.path(name)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, p)
        return p

    def finish(self) -> Path:
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.work, self.final)
        return self.final

    def fail(self, err: BaseException) -> None:
        self.write_json(FAILED, {
            "error": str(err), "type": type(err).__name__,
            "traceback": None if isinstance(err, PktError) else traceback.format_exc(),
            "note": "this run did not finish; rerun the same recipe to resume from here",
        })
