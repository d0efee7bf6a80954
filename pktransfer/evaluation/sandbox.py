"""Run untrusted generated programs (HumanEval, MBPP) so that nothing they do reaches the harness.

Each program runs in its own process, in a fresh session (its whole process group is killed at the end),
with a wall-clock timeout and these layers, each of which alone stops the usual escapes:

1. Resource limits (setrlimit): CPU seconds, address space (huge allocations fail), file size (also
   caps stdout/stderr, which go to files: printing gigabytes kills the program, not the harness),
   open files, processes, no core dumps.
2. Operating-system isolation where the harness may set it up: a new, empty network namespace (no
   interface is up: no network at all), and, when the harness runs as root, the program runs as the
   unprivileged user ``nobody`` (it cannot write, delete or signal anything the harness owns, and the
   process limit applies). Which of these took effect is reported with every result.
3. A guard installed in the program's interpreter before its code runs (a PEP 578 audit hook, which
   Python code cannot remove): it refuses writing, creating, renaming or deleting files outside the
   program's private folder, sockets, subprocesses, fork/exec, signals to other processes, and
   ctypes (the way around the other checks).

The working folder is a private temporary directory, removed afterwards; the environment is empty
apart from PATH, HOME/TMPDIR (the private folder) and PYTHONHASHSEED. Running generated code at all
requires an explicit opt-in (``allow_code_execution``), like lm-eval's ``--confirm_run_unsafe_code``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pktransfer.errors import PktError

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NOBODY = 65534

# Runs inside the sandboxed interpreter: installs the guard, then executes program.py as __main__.
_RUNNER = r'''
import os, sys
ROOT = os.path.realpath(os.getcwd())
_BLOCK_ALWAYS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.startfile", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "ctypes.call_function", "resource.setrlimit", "resource.prlimit", "os.setuid", "os.setgid",
}
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.mkdir": (0,),
                "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,),
                "os.utime": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
                "os.chdir": (), "os.removexattr": (0,), "os.setxattr": (0,)}

def _inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.realpath(os.path.join(ROOT, os.fspath(path)))
    return full == ROOT or full.startswith(ROOT + os.sep)

def _writes(mode, flags):
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))

def _guard(event, args):
    if event in _BLOCK_ALWAYS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        if path is not None and _writes(mode, flags) and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox folder is not allowed")
    elif event in _PATH_EVENTS:
        for i in _PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox folder is not allowed")
    elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
        if args and args[0] not in (os.getpid(), 0):
            raise PermissionError(f"sandbox: {event} of another process is not allowed")

sys.addaudithook(_guard)
with open("program.py", encoding="utf-8") as f:
    source = f.read()
code = compile(source, "program.py", "exec")
del f
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 10.0  # wall clock, seconds
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 2**30  # address space
    file_bytes: int = 8 * 2**20  # any file, stdout and stderr included
    open_files: int = 64
    processes: int = 256  # effective only for the unprivileged user
    output_chars: int = 4000  # kept in the result


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout | killed
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CodeExecutionNotAllowed(PktError):
    pass


def require_opt_in(allowed: bool, what: str) -> None:
    if not allowed:
        raise CodeExecutionNotAllowed(
            f"{what} runs code generated by the model, which is not allowed by default",
            hint="pass --allow-code-execution to `pkt eval` (or evaluation.allow_code_execution: true in the "
                 "recipe) after reading what the sandbox does: pktransfer/evaluation/sandbox.py")


def _unshare(flags: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(flags) == 0
    except (OSError, AttributeError):
        return False


# whether the interpreter can be run as ``nobody`` (not when it lives in a folder only root can read)
_drop_works: bool | None = None


def _preexec(limits: SandboxLimits, report_fd: int, drop: bool) -> Any:
    def setup() -> None:
        import resource

        isolated_net = _unshare(CLONE_NEWNET) or _unshare(CLONE_NEWUSER | CLONE_NEWNET)
        dropped = False
        if drop:
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                dropped = True
            except OSError:
                dropped = False
        for res, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                           (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                           (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_CORE, 0)):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(res, (value, value))
        os.write(report_fd, f"{int(isolated_net)}{int(dropped)}".encode())
        os.close(report_fd)

    return setup


def _read_capped(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(n + 1)
    except OSError:
        return ""
    text = data[:n].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > n else "")


def run_program(code: str, limits: SandboxLimits | None = None) -> ExecResult:
    """Run ``code`` as a Python program in the sandbox; passed = exit status 0 within the limits."""
    limits = limits or SandboxLimits()
    workdir = Path(tempfile.mkdtemp(prefix="pkt-sandbox-"))
    try:
        (workdir / "program.py").write_text(code, encoding="utf-8")
        (workdir / "runner.py").write_text(_RUNNER, encoding="utf-8")
        if os.geteuid() == 0:  # the program will run as nobody: only its own folder is writable
            os.chown(workdir, NOBODY, NOBODY)
            for f in workdir.iterdir():
                os.chown(f, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
        global _drop_works
        t0 = time.perf_counter()
        for drop in ([True, False] if os.geteuid() == 0 and _drop_works is not False else [False]):
            r_fd, w_fd = os.pipe()
            try:
                with open(out_path, "wb") as out, open(err_path, "wb") as err:
                    proc = subprocess.Popen([sys.executable, "-I", "-B", "runner.py"], cwd=workdir, env=env,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                            close_fds=True, pass_fds=(w_fd,), preexec_fn=_preexec(limits, w_fd, drop))
                if drop:
                    _drop_works = True
                break
            except PermissionError:  # nobody may not run this interpreter: fall back to the other layers
                os.close(w_fd)
                os.close(r_fd)
                _drop_works = False
        os.close(w_fd)
        status = None
        try:
            rc: int | None = proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
            if rc is None:
                proc.wait()
        seconds = time.perf_counter() - t0
        with os.fdopen(r_fd, "rb") as r:
            flags = r.read().decode()
        isolation = {"network_namespace": flags[:1] == "1", "unprivileged_user": flags[1:2] == "1", "audit_guard": True}
        if status is None:
            status = "passed" if rc == 0 else ("killed" if rc is not None and rc < 0 else "failed")
        return ExecResult(status, rc, _read_capped(out_path, limits.output_chars),
                          _read_capped(err_path, limits.output_chars), round(seconds, 3), isolation)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(codes: Sequence[str], limits: SandboxLimits | None = None, workers: int | None = None,
                 on_done: Any = None) -> list[ExecResult]:
    """Run many programs, a few at a time (each in its own sandbox); results in input order."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))

    def one(code: str) -> ExecResult:
        res = run_program(code, limits)
        if on_done:
            on_done()
        return res

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, codes))
