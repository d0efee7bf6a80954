"""Evaluation throughput for the offline student on CPU: items/s and generated tokens/s per task kind.

    python bench/eval_throughput.py [--threads 2] [--out bench/results/eval_throughput.json]

Generation (arithmetic, GSM8K lm-eval style) runs the harness's batched greedy decoding; MMLU runs the
log-likelihood path. The plain reference, in the same process, is one ``model.generate`` call per item
(batch 1) on the same arithmetic prompts, the way a simple evaluation loop would do it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pktransfer
from pktransfer.data import PromptFormatter, get_task
from pktransfer.evaluation import EvalOptions, evaluate_items
from pktransfer.models.builtin import DEFAULT_STUDENT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="bench/results/eval_throughput.json")
    args = ap.parse_args()
    pktransfer.set_threads(args.threads)
    loaded = pktransfer.load_model(pktransfer.recipe.ModelSpec(model=DEFAULT_STUDENT, device="cpu"))
    model, tok = loaded.model, loaded.tokenizer
    report: dict = {
        "model": DEFAULT_STUDENT,
        "dtype": str(loaded.dtype),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "runs": {},
    }
    cases = [
        ("arithmetic", {}, 48, "auto", 12),
        ("gsm8k", {"style": "lm-eval"}, 16, "plain", 128),
        ("mmlu", {}, 48, "plain", None),
    ]
    for name, params, n, fmt, budget in cases:
        task = get_task(name, params)
        items = task.split("test")[:n]
        formatter = PromptFormatter(tok, fmt, task.system_prompt, task.plain_separator)  # type: ignore[arg-type]
        res = evaluate_items(
            model,
            formatter,
            items,
            label="student",
            task=task,
            split="test",
            options=EvalOptions(batch_size=args.batch_size, max_new_tokens=budget or 16),
        )
        s = res.summary
        report["runs"][name] = {
            "kind": task.kind,
            "n": s["n"],
            "seconds": s["seconds"],
            "items_per_second": s["items_per_second"],
            "generated_tokens": s["generated_tokens"],
            "generated_tokens_per_second": s["generated_tokens_per_second"],
            "accuracy": s["accuracy"],
        }
        print(name, report["runs"][name], flush=True)

    # plain reference: batch 1, one generate call per item, on the first 16 arithmetic prompts
    task = get_task("arithmetic")
    formatter = PromptFormatter(tok, "auto")
    items = task.split("test")[:16]
    stop = formatter.stop_token_ids()
    t0 = time.perf_counter()
    n_tokens = 0
    with torch.inference_mode():
        for it in items:
            ids = torch.tensor([formatter.encode_prompt(it.prompt)])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tok.pad_token_id,
            )
            n_tokens += int(out.shape[1] - ids.shape[1])
    ref_s = time.perf_counter() - t0
    ref = {
        "n": len(items),
        "seconds": round(ref_s, 2),
        "items_per_second": round(len(items) / ref_s, 3),
        "generated_tokens_per_second": round(n_tokens / ref_s, 2),
    }
    report["plain_reference_arithmetic_batch1"] = ref
    report["speedup_items_per_second_vs_reference"] = round(
        report["runs"]["arithmetic"]["items_per_second"] / ref["items_per_second"], 2
    )
    print("reference (batch 1):", ref, "speed-up:", report["speedup_items_per_second_vs_reference"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
