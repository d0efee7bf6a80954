"""Benchmark: the fast path's attention kernel on CPU in bfloat16, math against flash, by batch length.

    PKT_DATA_DIR=/path/to/data python bench/cpu_attention.py                  # lengths 128, 256, 512
    PKT_DATA_DIR=/path/to/data python bench/cpu_attention.py --lengths 512 --steps 3

One LoRA training step of the offline student as the trainer takes it on the fast path with the MMLU study's
``fused_step: false`` (bf16 autocast, fp32 LoRA r 16 on all projections, dropout 0.05, logits only where the loss
reads; the model, batch assembly and step of bench/train_step.py), on a batch of the 8 longest training
examples of the MMLU study's task (Open-Instruct chat prompts, LaTen's training split) cut at each length, under
torch's math kernel and under its flash kernel. Each setting runs in its own process, so that its peak anonymous
memory (sampled every 20 ms during the steps) is its own; printed per length: the median step of each kernel, its
peak, and flash / math. ``training.cpu_attention: auto`` (pktransfer.training.CPU_MATH_ATTENTION_MAX_LENGTH) picks
the math kernel up to 192 tokens and flash above, from these figures. Writes bench/results/cpu_attention.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def mmlu_longest(length: int):
    """The batch: the 8 longest of the MMLU study's first 256 training examples, cut at ``length`` tokens."""

    def examples(tokenizer):
        from pktransfer.data import PromptFormatter, encode_items, get_task

        task = get_task("mmlu", {"style": "open-instruct", "train_source": "laten"})
        encoded = encode_items(PromptFormatter(tokenizer), task.split("train")[:256], length, "train")
        return sorted(encoded, key=lambda e: -len(e.input_ids))[:8]

    return examples


def one(kernel: str, length: int, steps: int) -> dict:
    """One setting, in this process: the median step and the peak anonymous memory of the steps."""
    import torch
    from train_step import build, step  # this folder's train-step benchmark: the same student, LoRA and step

    from pktransfer.memory import rss_anon_bytes, trim_heap

    torch.manual_seed(0)
    model, batch, opt = build("bfloat16", "fast-peft", mmlu_longest(length))  # the MMLU study's step (fused_step: false)
    peak, running = [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_anon_bytes())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(model, batch, opt, True, kernel)
        trim_heap()  # as the trainer does after every CPU step
        times.append(time.perf_counter() - t0)
    running[0] = False
    return {
        "kernel": kernel,
        "length": int(batch["input_ids"].shape[1]),
        "tokens": int(batch["attention_mask"].sum()),
        "step_seconds_median": round(statistics.median(times), 2),
        "step_seconds_all": [round(t, 2) for t in times],
        "peak_anon_gib": round(peak[0] / 2**30, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[128, 256, 512])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("KERNEL", "LENGTH"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.steps)))
        return
    rows = []
    for length in args.lengths:
        by = {}
        for kernel in ("math", "flash"):
            cmd = [sys.executable, __file__, "--one", kernel, str(length), "--steps", str(args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # e.g. a length shorter than the task's prompts: its own message, not a traceback
                sys.exit(f"{kernel} at length {length} failed: " + " / ".join(done.stderr.strip().splitlines()[-2:]))
            by[kernel] = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(by[kernel])
        m, f = by["math"], by["flash"]
        print(
            f"length {m['length']:>4} ({m['tokens']} tokens): "
            f"math {m['step_seconds_median']:.1f} s {m['peak_anon_gib']:.2f} GiB, "
            f"flash {f['step_seconds_median']:.1f} s {f['peak_anon_gib']:.2f} GiB, flash / math "
            f"{f['step_seconds_median'] / m['step_seconds_median']:.2f} in time, "
            f"{f['peak_anon_gib'] / m['peak_anon_gib']:.2f} in memory",
            flush=True,
        )
    out = Path(__file__).parent / "results" / "cpu_attention.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
