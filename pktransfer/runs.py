"""Output folders that are never left half-written, plus run metadata (versions, timings, memory).

A run works in ``OUT.partial/`` and is renamed to ``OUT`` only when it finished. A failed run leaves
``OUT.partial/FAILED.json`` saying why; rerunning the same recipe resumes there (training restarts
from its last checkpoint). An existing finished ``OUT`` is never overwritten unless asked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pktransfer.claims import Claim
from pktransfer.errors import OutputError, PktError
from pktransfer.fileio import honour_umask
from pktransfer.memory import rss_anon_bytes, rss_bytes
from pktransfer.signals import Stopped

FAILED = "FAILED.json"
RUN_JSON = "run.json"


@functools.cache
def code_commit() -> str:
    """The git commit of the pktransfer code this process runs, ``+dirty`` when tracked files of the package differ
    from it; ``unknown`` outside a git checkout (an installed wheel: its version says what it is)."""
    import subprocess

    pkg = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(pkg), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "pktransfer_commit": code_commit()}
    for pkg in (
        "pktransfer",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "safetensors",
        "tokenizers",
        "numpy",
        "scipy",
        "pydantic",
        "gguf",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import torch

        out["torch_threads"] = str(torch.get_num_threads())
        out["cuda"] = torch.version.cuda or "none"
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # the kernels torch dispatches to
    except ImportError:
        pass
    out["cpu"] = cpu_identity()
    return out


def cpu_identity() -> str:
    """The CPU as /proc/cpuinfo names it (model name, family/model/stepping, the bf16 units): a recorded cell rerun on
    another host can differ in its last bits through the CPU's kernels, so records say which CPU made them."""
    from pktransfer.models.loading import cpu_bf16_units

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model", "stepping"):
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    return (
        f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}, "
        f"stepping {fields.get('stepping', '?')}; bf16 units: {', '.join(cpu_bf16_units()) or 'none'})"
    )


class MemoryMonitor:
    """Samples anonymous RSS (and CUDA peak) in a background thread; reports a peak per stage."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._peak = 0
        self._peak_total = 0  # file-backed pages included (mapped weights; pkt plan's CPU check reads it)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_anon_bytes())
            self._peak_total = max(self._peak_total, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self._peak = rss_anon_bytes()
        self._peak_total = rss_bytes()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except ImportError:
            pass

    def peak(self) -> dict[str, float]:
        self._peak = max(self._peak, rss_anon_bytes())
        self._peak_total = max(self._peak_total, rss_bytes())
        out = {"peak_rss_anon_gib": round(self._peak / 2**30, 3)}
        if self._peak_total:
            out["peak_rss_gib"] = round(self._peak_total / 2**30, 3)
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


MARKER = ".pktransfer.json"  # in every folder pktransfer creates: only such folders may be replaced or resumed
# recipe fields that do not change a run's results (a resumed run may differ in these)
NOT_RESULT_FIELDS = ("output_dir", "compare", "plant")


def result_fields(recipe: dict[str, Any], ignore: tuple[str, ...] = NOT_RESULT_FIELDS) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k not in ignore}


def recipe_sha256(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def recipe_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """'training.lr: 0.0002 -> 0.0001; ...' for the fields that differ."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "(unset)") != b.get(k, "(unset)"))
    parts = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys[:limit]]
    return "; ".join(parts) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: Path, kind: str, fields: dict[str, Any] | None) -> None:
    from pktransfer.fileio import write_json

    write_json(
        folder / MARKER,
        {
            "written_by": "pktransfer",
            "kind": kind,
            "recipe_sha256": recipe_sha256(fields) if fields is not None else None,
            "recipe": fields,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def check_replaceable(folder: Path, what: str = "output folder") -> None:
    """Refuse (before any work) to replace a folder pktransfer did not write. An empty folder is fine."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise OutputError(
            f"{what} '{folder}' exists and is not a folder pktransfer wrote (it is a file or a link)",
            hint="choose another output_dir; pktransfer only replaces folders it created",
        )
    if read_marker(folder) is None and any(folder.iterdir()):
        raise OutputError(
            f"{what} '{folder}' was not written by pktransfer (it has no {MARKER}); refusing to replace or delete it",
            hint="choose another output_dir, or move that folder away yourself",
        )


def as_current_schema(fields: dict[str, Any]) -> dict[str, Any] | None:
    """Recorded recipe fields as this version reads them: fields added since are filled with the value that
    reproduces what the record computed (``recipe.LEGACY_DEFAULTS``, e.g. ``training.fast_path: false``), else their
    defaults, so upgrading pktransfer neither orphans finished runs nor passes them off as made another way. None when
    the record no longer validates."""
    from pktransfer.errors import PktError
    from pktransfer.recipe import LEGACY_DEFAULTS, recipe_from_dict

    fields = json.loads(json.dumps(fields))
    for dotted, value in LEGACY_DEFAULTS.items():
        section, key = dotted.split(".", 1)
        section, _, only = section.rstrip("]").partition("[")
        target = fields.get(section)
        if isinstance(target, dict) and key not in target and (not only or target.get("name") == only):
            target[key] = value
    extras = {k: fields.pop(k) for k in list(fields) if k in EXTRA_FIELDS}
    try:
        current = recipe_from_dict(fields, "recorded recipe").dump()
        upgraded = {k: EXTRA_FIELDS[k](v) for k, v in extras.items()}
    except (PktError, ValueError):
        return None
    return {**{k: current[k] for k in fields if k in current}, **upgraded}


def _planting(fields: dict[str, Any]) -> dict[str, Any]:
    from pktransfer.config import PlantSpec

    return PlantSpec.model_validate(fields).result_fields()


# what a folder records beside the recipe (``run_folder``'s ``extra_fields``), read as this version reads it
EXTRA_FIELDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"planting": _planting}


def check_matches(folder: Path, fields: dict[str, Any], what: str) -> None:
    """A folder pktransfer started (or finished) for a recipe may be reused only for the same recipe."""
    marker = read_marker(folder)
    if marker is None:
        raise OutputError(
            f"{what} '{folder}' has no {MARKER}: it was not written by this version of pktransfer, "
            "so it cannot be checked against the recipe",
            hint="choose another output_dir, or move that folder away yourself",
        )
    if marker.get("recipe_sha256") != recipe_sha256(fields):
        old = marker.get("recipe") or {}
        upgraded = as_current_schema(old)
        if upgraded is not None and recipe_sha256({k: upgraded.get(k) for k in fields}) == recipe_sha256(fields):
            # the same recipe, recorded before some fields existed (they read as what the record computed), or with
            # fields this version no longer counts among what the folder's results depend on
            return
        diff = recipe_differences(upgraded or old, fields)
        raise OutputError(
            f"{what} '{folder}' was made with a different recipe ({diff})",
            hint="rerun with the original recipe to reuse it, choose another output_dir, or pass --overwrite to start afresh",
        )


def check_same_weights(folder: Path, models: dict[str, Any], what: str) -> None:
    """A finished folder read its models by name; a local folder named there may since hold other weights (a teacher
    planted again, a student saved again) while the recipe reads the same. ``models`` maps a role to its ModelSpec:
    each role whose run.json recorded a local folder's ``weights_sha256`` is reusable only while that folder still
    holds those weights (builtin models come from pinned files; a hub id's revision is in the recipe)."""
    from pktransfer.models.loading import weights_sha256

    run = json.loads((folder / "run.json").read_text())
    for role, recorded in (run.get("models") or {}).items():
        spec = models.get(role)
        sha = recorded.get("weights_sha256") if isinstance(recorded, dict) else None
        if spec is None or not sha or str(spec.model).startswith("builtin:"):
            continue
        path = Path(spec.model).expanduser()
        if not path.is_dir():
            continue  # not there (yet): loading it reports that
        current = weights_sha256(path)
        if current != sha:
            raise OutputError(
                f"{what} '{folder}' was made with other {role} weights than '{spec.model}' holds now (sha256 "
                f"{sha[:12]} recorded, {current[:12]} now): the recipe names the same folder, but its results are not "
                "those of these weights",
                hint=f"put the weights it was made with back at '{spec.model}' to reuse it, or run the grid into a new "
                "output and records folder (mixing the two would compare cells of different models)",
            )


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot create the output folder '{folder}': {err.strerror or err}",
            hint="choose an output_dir in a writable location (its parent must be a folder)",
        ) from None


def check_output_location(folder: Path) -> None:
    """Fail before any work when ``folder`` cannot be created: a parent is a file, or not writable."""
    parent = folder
    while not parent.exists():
        if parent.is_symlink():
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"cannot create the output folder '{folder}': '{parent}' is a file, not a folder",
            hint="choose an output_dir whose parent is a folder",
        )
    if not os.access(parent, os.W_OK | os.X_OK) or str(parent.resolve()).startswith(("/proc", "/sys")):
        raise OutputError(
            f"cannot create the output folder '{folder}': '{parent}' is not writable",
            hint="choose an output_dir in a writable location",
        )


class RunDir:
    """``OUT.partial`` while running; renamed to ``OUT`` by :meth:`finish`.

    Both carry :data:`MARKER` with the hash of the recipe's result fields: an unfinished folder is resumed
    only for the same recipe, and ``overwrite`` replaces only a folder pktransfer wrote.
    """

    def __init__(
        self, output_dir: str | Path, overwrite: bool = False, recipe: dict[str, Any] | None = None, kind: str = "run"
    ) -> None:
        self.final = Path(output_dir).expanduser().resolve()
        self.work = self.final.with_name(self.final.name + ".partial")
        self.fields = result_fields(recipe) if recipe is not None else None
        check_output_location(self.final)
        # one writer per folder: a second process (terminal, machine, grid worker) stops here, naming the owner
        self.claim = Claim(self.final, "output folder").acquire()
        try:
            self._open(overwrite, kind)
        except BaseException:
            self.claim.release()
            raise

    def _open(self, overwrite: bool, kind: str) -> None:
        if self.final.exists() or self.final.is_symlink():
            if not overwrite:
                raise OutputError(
                    f"output folder '{self.final}' already exists",
                    hint="choose another output_dir (--output-dir) or pass --overwrite to replace a run pktransfer wrote there",
                )
            check_replaceable(self.final)
        self.overwrite = overwrite
        self.resumed = False
        if self.work.exists() or self.work.is_symlink():
            check_replaceable(self.work, "unfinished run folder")
            if read_marker(self.work) is not None:  # an unmarked (empty) folder has nothing to resume
                try:
                    if self.fields is not None:
                        check_matches(self.work, self.fields, "the unfinished run")
                    self.resumed = True
                except OutputError:
                    if not overwrite:
                        raise
                    shutil.rmtree(self.work)  # ours (marked), stale, and the user asked to start afresh
        _mkdir(self.work)
        if read_marker(self.work) is None:
            write_marker(self.work, kind, self.fields)
        (self.work / FAILED).unlink(missing_ok=True)

    def path(self, *parts: str) -> Path:
        p = self.work.joinpath(*parts)
        _mkdir(p.parent)
        return p

    def write_json(self, name: str, data: Any) -> Path:
        from pktransfer.fileio import write_json

        return write_json(self.path(name), data, indent=2)

    def finish(self) -> Path:
        if self.final.exists() or self.final.is_symlink():
            check_replaceable(self.final)  # checked at the start too; the folder may have changed since
            if self.final.is_dir() and not self.final.is_symlink():
                shutil.rmtree(self.final)
        honour_umask(self.work)  # library writers (safetensors) create 0600 files; results are for the team
        os.replace(self.work, self.final)
        self.claim.release()
        return self.final

    def fail(self, err: BaseException) -> None:
        with contextlib.suppress(OSError, PktError):  # a full disk must not hide the original error
            self.write_json(
                FAILED,
                {
                    "error": str(err),
                    "type": type(err).__name__,
                    # a user error or a requested stop is not a bug: no traceback
                    "traceback": None if isinstance(err, (PktError, Stopped)) else traceback.format_exc(),
                    "note": "this run did not finish; rerun the same recipe to resume from here",
                },
            )
        self.claim.release()
