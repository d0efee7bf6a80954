"""Claims: one writer per output folder, whichever process, terminal or machine starts it.

A claim on ``OUT`` is an owner file ``.OUT.pkt-owner.json`` beside it naming the owner (host, pid, the process's
start time, when it started, its latest heartbeat), read and written only while holding ``.OUT.pkt-lock``, an
OS file lock taken through the ``filelock`` library. So two processes that try to claim one folder at once are
serialised, and exactly one of them wins; the other is told who owns it.

A claim whose owner is gone is taken over: on the owner's host when its pid no longer runs (or runs another
program: the start time differs), from another host when its heartbeat is older than ``stale_after`` seconds
(``$PKT_CLAIM_STALE_SECONDS``, default 120; the owner beats every ``stale_after / 6`` seconds). A comparison grid
shared by several workers claims each cell, tuning cell and shared job this way (``pktransfer.study.schedule``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pktransfer.errors import OutputError


def stale_after_default() -> float:
    return float(os.environ.get("PKT_CLAIM_STALE_SECONDS", "120"))


def _process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux /proc), to tell a pid reused by another program."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@dataclass
class Owner:
    host: str
    pid: int
    process_start: str | None
    started_at: float
    heartbeat: float
    what: str = ""

    @classmethod
    def me(cls, what: str) -> Owner:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), now, now, what)

    def same_process(self, other: Owner) -> bool:
        return (self.host, self.pid, self.process_start) == (other.host, other.pid, other.process_start)

    def alive(self, stale_after: float) -> bool:
        """Whether this owner may still be working: its process runs (same host), or it beat recently (any host)."""
        if self.host == socket.gethostname():
            if not _pid_runs(self.pid):
                return False
            start = _process_start(self.pid)
            return start is None or self.process_start is None or start == self.process_start
        return time.time() - self.heartbeat < stale_after

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        beat = time.time() - self.heartbeat
        return f"host {self.host}, pid {self.pid}, since {since} (last heartbeat {beat:.0f} s ago)"


class ClaimBusy(OutputError):
    """The folder is claimed by a live owner."""

    def __init__(self, message: str, owner: Owner, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.owner = owner


class Claim:
    """``with Claim(folder, what):`` hold ``folder`` for this process, or raise :class:`ClaimBusy` naming the owner."""

    def __init__(self, target: str | Path, what: str = "output folder", stale_after: float | None = None) -> None:
        self.target = Path(target).expanduser().resolve()
        self.what = what
        self.stale_after = stale_after_default() if stale_after is None else stale_after
        self.lock_path = self.target.with_name(f".{self.target.name}.pkt-lock")
        self.owner_path = self.target.with_name(f".{self.target.name}.pkt-owner.json")
        self.me = Owner.me(what)
        self.took_over: Owner | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.held = False

    # ---- the owner file, read and written under the OS lock ------------------------------------------------

    def _lock(self) -> Any:
        from filelock import FileLock

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_path), timeout=60)

    def read_owner(self) -> Owner | None:
        try:
            return Owner(**json.loads(self.owner_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _write_owner(self, owner: Owner) -> None:
        from pktransfer.fileio import write_json

        write_json(self.owner_path, asdict(owner))

    def acquire(self) -> Claim:
        with self._lock():
            owner = self.read_owner()
            if owner is not None and not owner.same_process(self.me) and owner.alive(self.stale_after):
                raise ClaimBusy(
                    f"{self.what} '{self.target}' is being written by another process: {owner.describe()}",
                    owner,
                    hint="wait for it to finish, or choose another output_dir; if that process is gone its claim is "
                    f"taken over automatically (same host: at once; another host: once its heartbeat is older than "
                    f"{self.stale_after:.0f} s, PKT_CLAIM_STALE_SECONDS)",
                )
            if owner is not None and not owner.same_process(self.me):
                self.took_over = owner
            self.me.heartbeat = time.time()
            self._write_owner(self.me)
        self.held = True
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"pkt-claim-{self.target.name}")
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        interval = max(self.stale_after / 6, 0.05)
        while not self._stop.wait(interval):
            with contextlib.suppress(Exception), self._lock():
                owner = self.read_owner()
                if owner is None or not owner.same_process(self.me):
                    return  # taken over (we were presumed dead): stop beating; the new owner writes
                self.me.heartbeat = time.time()
                self._write_owner(self.me)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        with contextlib.suppress(Exception), self._lock():
            owner = self.read_owner()
            if owner is not None and owner.same_process(self.me):
                self.owner_path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> Claim:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
