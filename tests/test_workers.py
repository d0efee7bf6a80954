"""Several processes, one folder or one grid: claims, clean stops, take-over of dead workers, --workers."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import pktransfer
from pktransfer.claims import Claim, ClaimBusy, Owner, _process_start
from pktransfer.cli import app

# A run in another process that waits at the end of training step GATE_STEP until the file GO exists (or a stop
# is pending), after writing STARTED: the test acts on a run that is surely mid-training.
GATED_RUN = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
import pktransfer.methods.lora as lora
from pktransfer import signals

folder, gate_step = Path(sys.argv[1]), int(sys.argv[2])

class Gate(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == gate_step:
            (folder / "STARTED").write_text("x")
            deadline = time.time() + 120
            while not (folder / "GO").exists() and signals.pending() is None and time.time() < deadline:
                time.sleep(0.02)

lora.LoraMethod.callbacks = lambda self, ctx: [Gate()]
sys.argv = ["pkt", "run", str(folder / "recipe.yaml"), "-q"]
from pktransfer.cli import main
main()
"""


def _gated(tiny_recipe, tmp_path: Path, gate_step: int, name: str = "run") -> tuple[subprocess.Popen, Path]:
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["training"].update(max_steps=6, save_steps=2)
    tiny_recipe["output_dir"] = str(tmp_path / name)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe))
    (tmp_path / "gated.py").write_text(GATED_RUN)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "gated.py"), str(tmp_path), str(gate_step)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 180
    while not (tmp_path / "STARTED").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    return proc, tmp_path / name


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _resumes_to_the_uninterrupted_adapter(tiny_recipe, tmp_path: Path, out: Path, checkpoint: str) -> None:
    """Rerunning the stopped recipe resumes from ``checkpoint`` and trains an uninterrupted run's adapter."""
    res = pktransfer.run(pktransfer.load_recipe(tmp_path / "recipe.yaml"), quiet=True, evaluate=False)
    assert res.run["training"]["resumed_from"].endswith(checkpoint)
    recipe = pktransfer.recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "uninterrupted")})
    want = _adapter(pktransfer.run(recipe, quiet=True, evaluate=False).output_dir)
    got = _adapter(out)
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k


# ---- claims ----------------------------------------------------------------------------------------------------


def _owner_file(target: Path, owner: Owner) -> None:
    target.with_name(f".{target.name}.pkt-owner.json").write_text(json.dumps(owner.__dict__))


def test_a_claim_names_a_live_owner_and_is_taken_over_once_it_is_gone(tmp_path):
    target = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = time.time()
        _owner_file(target, Owner(socket.gethostname(), sleeper.pid, _process_start(sleeper.pid), now, now, "run"))
        with pytest.raises(ClaimBusy, match=f"pid {sleeper.pid}") as err:
            Claim(target).acquire()
        assert err.value.owner.pid == sleeper.pid and "fix" in str(err.value)
    finally:
        sleeper.kill()
        sleeper.wait()
    claim = Claim(target).acquire()  # same host, the pid is gone: taken over at once
    assert claim.took_over is not None and claim.took_over.pid == sleeper.pid
    claim.release()
    assert not target.with_name(".out.pkt-owner.json").exists()

    # another host: alive while its heartbeat is recent, taken over once it is older than stale_after
    _owner_file(target, Owner("elsewhere", 1, None, now, time.time(), "run"))
    with pytest.raises(ClaimBusy, match="host elsewhere"):
        Claim(target, stale_after=60).acquire()
    _owner_file(target, Owner("elsewhere", 1, None, now, time.time() - 61, "run"))
    with Claim(target, stale_after=60) as claim:
        assert claim.took_over is not None and claim.took_over.host == "elsewhere"


def test_a_held_claim_beats_and_a_reused_pid_does_not_keep_it(tmp_path):
    target = tmp_path / "out"
    with Claim(target, stale_after=0.3) as claim:
        first = claim.read_owner().heartbeat
        time.sleep(0.25)
        assert claim.read_owner().heartbeat > first
    # our own pid recorded with another start time: a dead process whose pid was reused
    _owner_file(target, Owner(socket.gethostname(), os.getpid(), "1", 0.0, 0.0, "run"))
    with Claim(target) as claim:
        assert claim.took_over is not None


# ---- one folder, one writer ------------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_folder_stops_at_once_naming_the_owner(tiny_recipe, tmp_path):
    proc, out = _gated(tiny_recipe, tmp_path, gate_step=1)
    try:
        partial = out.with_name(out.name + ".partial")
        before = {p: p.stat().st_mtime_ns for p in partial.rglob("*")}
        t0 = time.time()
        res = CliRunner().invoke(app, ["run", str(tmp_path / "recipe.yaml"), "-q"])
        assert res.exit_code == 2 and time.time() - t0 < 30
        text = " ".join(res.output.split())
        assert f"pid {proc.pid}" in text and socket.gethostname() in text and "being written by another process" in text
        assert {p: p.stat().st_mtime_ns for p in partial.rglob("*")} == before  # nothing of the first touched
        with pytest.raises(ClaimBusy):
            pktransfer.run(pktransfer.load_recipe(tmp_path / "recipe.yaml"), quiet=True)
    finally:
        (tmp_path / "GO").write_text("x")
        output = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    assert (out / "run.json").is_file() and not (tmp_path / ".run.pkt-owner.json").exists()


# ---- stopping cleanly, dead workers ---------------------------------------------------------------------------


def test_sigterm_leaves_failed_json_and_a_checkpoint_and_resumes_to_the_same_result(tiny_recipe, tmp_path):
    proc, out = _gated(tiny_recipe, tmp_path, gate_step=3)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, output[-3000:]
    assert "stopped by SIGTERM" in output
    partial = out.with_name(out.name + ".partial")
    failed = json.loads((partial / "FAILED.json").read_text())
    assert failed["type"] == "Stopped" and "SIGTERM" in failed["error"]
    assert (partial / "checkpoints" / "checkpoint-3").is_dir()  # saved at the step the stop arrived in
    assert not (tmp_path / ".run.pkt-owner.json").exists()  # the claim was released
    _resumes_to_the_uninterrupted_adapter(tiny_recipe, tmp_path, out, "checkpoint-3")


def test_a_killed_runs_claim_is_taken_over_and_the_run_resumes(tiny_recipe, tmp_path):
    proc, out = _gated(tiny_recipe, tmp_path, gate_step=3)
    assert json.loads((tmp_path / ".run.pkt-owner.json").read_text())["pid"] == proc.pid
    proc.kill()  # SIGKILL: no handler runs, the owner file stays
    proc.wait()
    assert (tmp_path / ".run.pkt-owner.json").exists()
    _resumes_to_the_uninterrupted_adapter(tiny_recipe, tmp_path, out, "checkpoint-2")


# ---- several workers on one grid ---------------------------------------------------------------------------------


def _grid_recipe(tiny_recipe, folder: Path) -> dict:
    grid = dict(tiny_recipe)
    grid["task"] = {**tiny_recipe["task"], "validation": 4}
    grid["evaluation"] = {**tiny_recipe["evaluation"], "teacher": True, "student": True}
    grid["output_dir"] = str(folder)
    grid["compare"] = {
        "methods": [
            "lora",
            {"name": "kd", "alpha": 0.5},
            {"name": "seeking", "n_seed": 3, "tune": {"key": "training.lr", "values": [1e-3, 5e-4]}},
        ],
        "seeds": [0, 1],
    }
    return grid


def _without_timings(csv_text: str) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if not k.startswith("cost_")} for row in csv.DictReader(io.StringIO(csv_text))]


def test_three_workers_run_every_cell_once_and_reproduce_the_one_process_report(tiny_recipe, tmp_path):
    from pktransfer.study.workers import compare_with_workers

    for name in ("workers", "single"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(_grid_recipe(tiny_recipe, tmp_path / name)))
    many = compare_with_workers(tmp_path / "workers.yaml", [], 3, progress=pktransfer.progress.Progress(quiet=True))
    one = pktransfer.compare(pktransfer.load_recipe(tmp_path / "single.yaml"), quiet=True)

    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "workers" / "workers").glob("worker-*.log")))
    # the line a worker logs when it starts a job it claimed (a busy job's line goes on "is being run by ...")
    runs = re.findall(
        r"compare: (cell \d+/\d+: \S+, seed \d|tuning \d+/\d+: [^,]+, training.lr = \S+ \(validation\))$", logs, re.M
    )
    assert len(runs) == len(set(runs)) == 6 + 2, runs  # 6 grid cells and 2 tuning cells, each run once
    assert len(re.findall(r"compare: evaluating the untouched teacher and student once$", logs, re.M)) == 1
    assert len(re.findall(r"compare: running `extract` once for the cells of 'seeking' \(\S+\)$", logs, re.M)) == 1
    assert sum(1 for p in (tmp_path / "workers" / "workers").glob("worker-*.log") if "compare: " in p.read_text()) >= 2

    a, b = many.result, one.result
    assert a["chosen"] == b["chosen"]
    assert [(t["label"], t["value"], t["validation"]) for t in a["tuning"]] == [
        (t["label"], t["value"], t["validation"]) for t in b["tuning"]
    ]
    strip = ("folder", "prepare_seconds", "train_seconds", "wall_seconds", "peak_rss_anon_gib", "peak_cuda_gib", "teacher")
    assert [{k: v for k, v in c.items() if k not in strip} for c in a["cells"]] == [
        {k: v for k, v in c.items() if k not in strip} for c in b["cells"]
    ]
    assert _without_timings((many.output_dir / "compare.csv").read_text()) == _without_timings(
        (one.output_dir / "compare.csv").read_text()
    )
    sa, sb = a["summary"]["by_label"], b["summary"]["by_label"]
    for label in sa:
        assert sa[label]["metrics"] == sb[label]["metrics"]
        assert sa[label]["paired_vs_baseline"] == sb[label]["paired_vs_baseline"]
        assert sa[label]["spent"] == sb[label]["spent"]
    assert a["summary"]["equal_budget"] == b["summary"]["equal_budget"]


def test_the_cli_starts_workers_and_refuses_overwrite_with_them(tiny_recipe, tmp_path):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["output_dir"] = str(tmp_path / "grid")
    tiny_recipe["compare"] = {"methods": ["lora", "pissa"], "seeds": [0]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(tiny_recipe))
    cmd = [sys.executable, "-m", "pktransfer.cli", "compare", str(tmp_path / "grid.yaml"), "-q"]
    done = subprocess.run([*cmd, "--workers", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "grid" / "compare.md").is_file()
    assert sorted(p.name for p in (tmp_path / "grid" / "workers").glob("worker-*.log")) == ["worker-0.log", "worker-1.log"]
    refused = subprocess.run([*cmd, "--workers", "2", "--overwrite"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--overwrite with --workers" in refused.stderr


def test_sigterm_during_a_shared_job_leaves_failed_json_and_releases_the_claim(tiny_recipe, tmp_path):
    """Every run folder (pkt run, a shared job such as `pkt extract`, the base evaluation) stops cleanly."""
    script = tmp_path / "extract.py"
    script.write_text(
        "import os, signal, sys\n"
        "import pktransfer.methods.seeking as seeking\n"
        "real = seeking.compute_sensitivity\n"
        "def stop(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*a, **k)\n"
        "seeking.compute_sensitivity = stop\n"
        "sys.argv = ['pkt', 'extract', sys.argv[1], '-q']\n"
        "from pktransfer.cli import main\n"
        "main()\n"
    )
    tiny_recipe["method"] = {"name": "seeking", "n_seed": 3}
    tiny_recipe["output_dir"] = str(tmp_path / "ext")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "r.yaml")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    failed = json.loads((tmp_path / "ext.partial" / "FAILED.json").read_text())
    assert failed["type"] == "Stopped" and failed["traceback"] is None
    assert not (tmp_path / ".ext.pkt-owner.json").exists()


RELEASE = """
import torch
from pktransfer.memory import release_memory
big = torch.ones(4 << 20, dtype=torch.uint8)
del big  # glibc now keeps freed buffers up to 4 MB in its heap instead of unmapping them
chunks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(200)]
kept = chunks[::10]  # pins the heap: the 180 freed MB in between stay resident until trimmed
del chunks
print(release_memory())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_memory_returns_freed_buffers_to_the_system() -> None:
    # What each grid cell does after it finishes, so a long `pkt compare` does not grow from cell to cell.
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True, timeout=120)
    assert int(out.stdout.split()[-1]) > 150 << 20


def test_the_worker_plan_gives_each_worker_one_device_or_its_share_of_the_cores():
    from pktransfer.study.schedule import worker_plan

    gpus = worker_plan(3, ["cuda:0", "cuda:1"])  # fewer devices than workers: they cycle
    assert [e["CUDA_VISIBLE_DEVICES"] for e in gpus] == ["0", "1", "0"]
    assert [e["PKT_WORKER_INDEX"] for e in gpus] == ["0", "1", "2"] and "OMP_NUM_THREADS" not in gpus[0]
    assert worker_plan(1, ["cuda"])[0]["CUDA_VISIBLE_DEVICES"] == "0"
    cpus = worker_plan(2, None, cpu_count=16)  # CPU workers hide the GPUs and split the cores
    assert all(e["CUDA_VISIBLE_DEVICES"] == "" and e["OMP_NUM_THREADS"] == e["PKT_THREADS"] == "8" for e in cpus)
    assert worker_plan(3, ["cpu"], cpu_count=2)[0]["OMP_NUM_THREADS"] == "1"  # never 0 threads
    for bad, what in ((["cuda:x"], "not cuda:N"), (["tpu:0"], "unknown device"), (None, "at least one")):
        with pytest.raises(pktransfer.RecipeError, match=what):
            worker_plan(0 if bad is None else 2, bad)
