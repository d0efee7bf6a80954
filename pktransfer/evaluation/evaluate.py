"""Evaluate a model on a task split: generate, extract, score, and save per-item results."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pktransfer.data import Item, PromptFormatter
from pktransfer.evaluation.generation import generate
from pktransfer.evaluation.metrics import SCORERS
from pktransfer.progress import Progress


@dataclass
class EvalResult:
    label: str
    task: str
    split: str
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(self.summary["accuracy"])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{self.label}.{self.task}.{self.split}"
        with open(folder / f"{stem}.items.jsonl", "w") as f:
            for r in self.records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (folder / f"{stem}.summary.json").write_text(json.dumps(self.summary, indent=2))


def items_sha256(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def evaluate_items(model: Any, formatter: PromptFormatter, items: list[Item], *, label: str, task: str, split: str,
                   scorer: str, batch_size: int, max_new_tokens: int, progress: Progress | None = None) -> EvalResult:
    score = SCORERS[scorer]
    prompts = [formatter.encode_prompt(it.prompt) for it in items]
    t0 = time.perf_counter()
    with (progress or Progress(quiet=True)).task(f"eval {label} on {task}/{split}", total=len(items)) as advance:
        outputs, n_tokens = generate(model, formatter.tokenizer, prompts, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, stop_token_ids=formatter.stop_token_ids(),
                                     on_batch=lambda n, _t: advance(n))
    seconds = time.perf_counter() - t0
    records = []
    for it, out in zip(items, outputs, strict=True):
        pred, ok = score(out, it.reference)
        records.append({"id": it.id, "prompt": it.prompt, "output": out, "extracted": pred,
                        "reference": it.reference, "correct": ok})
    n_correct = sum(r["correct"] for r in records)
    summary = {
        "label": label, "task": task, "split": split, "n": len(items), "correct": n_correct,
        "accuracy": n_correct / len(items), "scorer": scorer,
        "protocol": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "prompt_format": formatter.describe(), "shots": 0},
        "data_sha256": items_sha256(items), "seconds": round(seconds, 2),
        "items_per_second": round(len(items) / seconds, 3) if seconds else None,
        "generated_tokens": n_tokens,
    }
    return EvalResult(label, task, split, summary, records)
