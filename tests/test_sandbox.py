"""The sandbox contains hostile programs, and the harness survives all of them without hanging."""

from __future__ import annotations

import os
import socket
import time

import pytest

from pktransfer.evaluation.sandbox import CodeExecutionNotAllowed, SandboxLimits, require_opt_in, run_program

FAST = SandboxLimits(timeout=5.0, cpu_seconds=5)


def test_a_correct_program_passes_and_a_failing_one_fails():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('fine')\n", FAST)
    assert ok.passed and ok.stdout == "fine\n" and ok.returncode == 0
    bad = run_program("assert 1 == 2, 'nope'\n", FAST)
    assert bad.status == "failed" and "AssertionError: nope" in bad.stderr
    syntax = run_program("def f(:\n", FAST)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_infinite_loop_is_stopped_by_the_wall_clock():
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout=1.5, cpu_seconds=30))
    assert r.status == "timeout" and time.perf_counter() - t0 < 10


def test_sleeping_forever_is_stopped_too():
    r = run_program("import time\ntime.sleep(3600)\n", SandboxLimits(timeout=1.0))
    assert r.status == "timeout"


def test_fork_bomb_is_contained():
    t0 = time.perf_counter()
    r = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    assert not r.passed and time.perf_counter() - t0 < 15
    r = run_program("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n", FAST)
    assert not r.passed and "not allowed" in r.stderr


def test_huge_allocation_fails_inside_the_program():
    r = run_program("x = bytearray(64 * 2**30)\n", SandboxLimits(timeout=10, memory_bytes=1 * 2**30))
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_writing_or_deleting_files_outside_its_folder_is_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    outside_new = tmp_path / "new.txt"
    for code in (f"open({str(victim)!r}, 'w').write('gone')",
                 f"import os\nos.remove({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
                 f"open({str(outside_new)!r}, 'x').write('x')",
                 f"import pathlib\npathlib.Path({str(victim)!r}).unlink()"):
        r = run_program(code, FAST)
        assert not r.passed, code
    assert victim.read_text() == "precious" and not outside_new.exists()
    # its own folder is writable
    assert run_program("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n", FAST).passed


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        r = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n", FAST)
        assert not r.passed
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the harness's socket
    finally:
        server.close()


def test_killing_its_parent_is_refused_and_the_harness_survives():
    r = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", FAST)
    assert not r.passed
    r = run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n", FAST)
    assert not r.passed  # we are still here to assert it


def test_printing_gigabytes_is_capped():
    t0 = time.perf_counter()
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)\n",
                    SandboxLimits(timeout=20, file_bytes=4 * 2**20, output_chars=1000))
    assert not r.passed and len(r.stdout) < 2000 and time.perf_counter() - t0 < 20


def test_ctypes_and_environment_are_out_of_reach():
    assert not run_program("import ctypes\nctypes.CDLL(None).system(b'true')\n", FAST).passed
    r = run_program("import os\nprint(sorted(os.environ))\n", FAST)
    assert r.passed and "PKT" not in r.stdout and "PATH" in r.stdout


def test_code_execution_needs_an_explicit_opt_in():
    with pytest.raises(CodeExecutionNotAllowed, match="not allowed by default") as err:
        require_opt_in(False, "task 'humaneval'")
    assert "--allow-code-execution" in err.value.hint
    require_opt_in(True, "task 'humaneval'")
