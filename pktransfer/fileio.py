"""Atomic writes: every file pktransfer writes goes to a temporary name in the same folder and is renamed.

A reader (a resumed run, a comparison sharing a cache) therefore sees a file whole or not at all. A
failed write (disk full, permission denied) raises :class:`~pktransfer.errors.OutputError` naming the
file and leaves no temporary behind. Files and folders get the permissions the process umask gives any
other tool's (0644 / 0755 under umask 022), not the private 0600 / 0700 of a temporary name, so a team
on a shared filesystem can read the results.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pktransfer.errors import OutputError


def _io_error(path: Path, err: OSError) -> OutputError:
    return OutputError(
        f"could not write '{path}': {err.strerror or err}",
        hint="free disk space or fix the folder's permissions, then rerun the same command to resume",
    )


def process_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc), else by the set-and-restore idiom."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp's 0600 is for the temporary name only
        os.close(fd)
    except OSError as err:
        raise _io_error(path, err) from None
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~process_umask())  # writers that recreate the file (safetensors) make it 0600 again
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _io_error(path, err) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(data, indent=indent, default=str, ensure_ascii=False))


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata))


def torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def honour_umask(folder: str | Path) -> None:
    """Give every file and folder under ``folder`` (all written by pktransfer or by the libraries it calls, such as
    safetensors, which creates its files 0600) the modes the process umask gives."""
    mask = process_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (which must be ours to
    replace), on failure it is removed and ``path`` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~process_umask())  # mkdtemp's 0700 is for the temporary name only
    except OSError as err:
        raise _io_error(path, err) from None
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _io_error(path, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
