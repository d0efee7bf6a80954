"""Benchmark: Seeking's streaming sensitivity and submatrix search on the offline 1.5B teacher.

    python bench/seeking_bench.py                     # 8 seed samples, all parts
    python bench/seeking_bench.py --part submatrix    # only the submatrix search (no model)

Sensitivity: each accumulator mode runs in its own process, so peak memory is measured cleanly:
  reduced  streaming |θ·g| into per-row/column sums (every structure but submatrix)
  full     streaming into the per-element map (the exact submatrix structure)
Each process first runs a streaming-only pass over the seed samples (peak anonymous memory, RssAnon,
against the teacher's weight bytes; targets: reduced <= 1.25x, full <= weights + map bytes + 10%),
then per sample a streamed and a bare forward+backward back to back, alternating which goes first;
the median per-sample time ratio is the overhead (target <= 1.10).

Submatrix: the vectorised search on a random 8960x1536 map for a 4864x896 block, against the
paper's Python loop over positions timed on a smaller matrix and extrapolated per position (target
>= 500x, same block).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEACHER = "builtin:qwen2.5-coder-1.5b-instruct"


def seed_batches(n: int, max_length: int, tokenizer, task: str) -> list[dict]:
    import torch

    from pktransfer.data import PromptFormatter, encode_items, get_task

    t = get_task(task)
    examples = encode_items(PromptFormatter(tokenizer), t.split("seed")[:n], max_length, "seed")
    return [{"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels])} for e in examples]


def run_mode(mode: str, n: int, max_length: int, task: str, map_dtype: str, checkpointing: bool = False) -> dict:
    """One process per structure mode: a streaming-only pass (peak memory), then per sample a streaming
    and a bare forward+backward, alternating which goes first, for the same-process time ratio."""
    import torch

    from pktransfer.methods.injection import group_roles
    from pktransfer.methods.seeking import accumulator_modes, vocab_modules
    from pktransfer.models import load_model
    from pktransfer.ops.sensitivity import StreamingSensitivity
    from pktransfer.recipe import ModelSpec
    from pktransfer.runs import MemoryMonitor, rss_anon_bytes

    t0 = time.perf_counter()
    teacher = load_model(ModelSpec(model=TEACHER, device="cpu", dtype="float32"))
    load_s = time.perf_counter() - t0
    model = teacher.model
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = seed_batches(n, max_length, teacher.tokenizer, task)
    after_load = rss_anon_bytes()
    modes = accumulator_modes(teacher.arch, "submatrix" if mode == "full" else "row_column", group_roles(["all"]))
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[map_dtype]
    stream = StreamingSensitivity(model, modes, dt, vocab_modules=vocab_modules(teacher.arch))

    def streamed(b: dict) -> float:
        s = time.perf_counter()
        if checkpointing:  # as sensitivity_over does it: train mode (checkpointing needs it), no dropout
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.eval()
        with stream:
            model(**b).loss.backward()
        if checkpointing:
            model.gradient_checkpointing_disable()
            model.eval()
        return time.perf_counter() - s

    def bare(b: dict) -> float:
        s = time.perf_counter()
        model(**b).loss.backward()
        took = time.perf_counter() - s
        model.zero_grad(set_to_none=True)
        return took

    with MemoryMonitor() as mon:
        mon.reset()
        first_pass = [streamed(b) for b in batches]
        peak = mon.peak()["peak_rss_anon_gib"] * 2**30
    pairs = []
    for i, b in enumerate(batches):
        if i % 2:
            tb = bare(b)
            ts = streamed(b)
        else:
            ts = streamed(b)
            tb = bare(b)
        pairs.append((ts, tb))
    map_bytes = 0
    if mode == "full":
        el = 4 if map_dtype == "float32" else 2
        for w in teacher.arch.weights():
            if len(w.shape) == 2 and w.role not in ("embed", "lm_head"):
                map_bytes += w.shape[0] * w.shape[1] * el
    return {
        "mode": mode,
        "load_s": load_s,
        "first_pass": first_pass,
        "pairs": pairs,
        "tokens": [int(b["input_ids"].shape[1]) for b in batches],
        "weight_bytes": weight_bytes,
        "map_bytes": map_bytes,
        "rss_after_load": after_load,
        "peak": peak,
    }


def bench_sensitivity(args: argparse.Namespace) -> None:
    results = {}
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--_mode",
            mode,
            "--n",
            str(args.n),
            "--max-length",
            str(args.max_length),
            "--task",
            args.task,
            "--map-dtype",
            args.map_dtype,
        ]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    r0 = next(iter(results.values()))
    w = r0["weight_bytes"]
    print(f"gradient checkpointing in the streamed passes: {args.gradient_checkpointing}")
    print(
        f"teacher {TEACHER} fp32: weights {w / gib:.2f} GiB (RssAnon after load {r0['rss_after_load'] / gib:.2f}); "
        f"{args.n} seed samples of {min(r0['tokens'])}-{max(r0['tokens'])} tokens ({args.task})"
    )
    print(f"{'mode':<8} {'stream s':>9} {'bare s':>7} {'ratio':>6} {'peak anon GiB':>14} {'x weights':>10}  target")
    for mode, r in results.items():
        ratios = [ts / tb for ts, tb in r["pairs"]]
        ts_med = statistics.median(p[0] for p in r["pairs"])
        tb_med = statistics.median(p[1] for p in r["pairs"])
        peak = r["peak"]
        if mode == "full":
            target = f"time <= 1.10x; peak <= {(w + r['map_bytes']) * 1.1 / gib:.2f} GiB (weights + map + 10%)"
        else:
            target = f"time <= 1.10x; peak <= {1.25 * w / gib:.2f} GiB (1.25x weights)"
        print(
            f"{mode:<8} {ts_med:>9.2f} {tb_med:>7.2f} {statistics.median(ratios):>6.3f} {peak / gib:>14.2f} "
            f"{peak / w:>10.2f}  {target}"
        )
    print(
        "ratio: median over samples of streamed/bare time, the two run back to back on the same sample in one "
        "process (order alternating); bare keeps full gradients (about 2x weights), streaming never does"
    )
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/seeking_sensitivity.json").write_text(json.dumps(results, indent=1))


def bench_submatrix() -> None:
    import torch

    from pktransfer.ops.selection import max_sum_submatrix, max_sum_submatrix_bruteforce

    torch.manual_seed(0)
    big = torch.rand(8960, 1536)
    fast = []
    for _ in range(5):
        t = time.perf_counter()
        pos = max_sum_submatrix(big, 4864, 896)
        fast.append(time.perf_counter() - t)
    small = torch.rand(700, 300)
    t = time.perf_counter()
    slow_pos = max_sum_submatrix_bruteforce(small, 380, 175)
    loop_s = time.perf_counter() - t
    positions_small = (700 - 380 + 1) * (300 - 175 + 1)
    per_pos = loop_s / positions_small
    positions_big = (8960 - 4864 + 1) * (1536 - 896 + 1)
    same = max_sum_submatrix(small, 380, 175)[:2] == slow_pos[:2]
    extrap = per_pos * positions_big
    print(f"submatrix 8960x1536 -> 4864x896: vectorised median {statistics.median(fast):.3f}s (block at {pos[:2]})")
    print(
        f"python loop: {per_pos * 1e6:.1f} us/position on 700x300 -> 380x175 ({positions_small} positions, "
        f"same block: {same}); extrapolated to {positions_big} positions: {extrap:.1f}s; "
        f"speed-up {extrap / statistics.median(fast):.0f}x (target >= 500x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "sensitivity", "submatrix"], default="all")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--task", default="gsm8k", help="seed split to use (gsm8k needs the benchmark data folder)")
    ap.add_argument("--map-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--modes", default="reduced,full", help="accumulator modes to run, comma-separated")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the streamed passes (the bare reference never does)",
    )
    ap.add_argument("--_mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._mode:
        print(json.dumps(run_mode(args._mode, args.n, args.max_length, args.task, args.map_dtype, args.gradient_checkpointing)))
        return
    if args.part in ("all", "submatrix"):
        bench_submatrix()
    if args.part in ("all", "sensitivity"):
        bench_sensitivity(args)


if __name__ == "__main__":
    main()
