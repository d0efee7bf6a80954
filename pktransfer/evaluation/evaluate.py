"""Evaluate a model on a task split: generate / score choices / run code, and save per-item results.

Three kinds of task (``Task.kind``):
- ``generate``: batched greedy generation (left padding, stop tokens and stop strings), scored per item
  by ``Task.score`` (a primary ``correct`` and optional extra metrics such as GSM8K's strict filter or
  Super-NI's ROUGE-L);
- ``choice``: the log-likelihood of each continuation in ``item.metadata["choices"]`` after the prompt;
  the prediction is the argmax (MMLU), with per-subject, macro and micro accuracy;
- ``code``: n completions per problem (greedy for n = 1, sampled otherwise), each program run in the
  sandbox; pass@k with the unbiased estimator.

Every result keeps per-item records (the item's prompt, ``model_input``: the exact text fed to the model after
formatting, raw output, extracted answer, reference, correct) and a summary with the protocol (shots, template,
filters, limit and subset seed, data sha256). Prompts are assembled by :func:`model_input`: the task's evaluation
prompt in the formatter's evaluation format, then the task's answer cue (Open-Instruct's "Answer:" after the
assistant header) where the protocol has one.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pktransfer.data import Item, PromptFormatter, Task
from pktransfer.evaluation.generation import continuation_logliks, encode_pair, generate, run_batched
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
        from pktransfer.fileio import write_json, write_jsonl

        stem = f"{self.label}.{self.task}.{self.split}"
        write_jsonl(folder / f"{stem}.items.jsonl", self.records)
        write_json(folder / f"{stem}.summary.json", self.summary, indent=2)  # last: it marks the evaluation done

    @staticmethod
    def finished(folder: Path, label: str, task: str, split: str) -> dict[str, Any] | None:
        """The summary :meth:`save` left in ``folder`` for this evaluation (a resumed run's), or None."""
        path = folder / f"{label}.{task}.{split}.summary.json"
        return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class EvalOptions:
    batch_size: int | str = 16  # or "auto"
    max_new_tokens: int = 16
    limit: int | None = None
    subset_seed: int | None = None
    n_samples: int = 1  # code tasks: completions per problem
    temperature: float = 0.0  # code tasks with n_samples > 1 (0.8 is the usual choice)
    top_p: float = 1.0  # with sampling: nucleus sampling (Open-Instruct's HumanEval: 0.95)
    seed: int = 0
    allow_code_execution: bool = False
    sandbox_timeout: float = 10.0
    backend: str = "hf"  # hf or vllm (resolved: pktransfer.evaluation.vllm_backend.resolve)
    vllm_source: str | None = None  # with vllm: the folder (or hub id) the engine loads: the evaluated weights
    vllm_dtype: str = "auto"
    vllm_max_model_len: int = 4096


def vllm_generates(opts: EvalOptions, task: Task) -> bool:
    """Whether vLLM generates this evaluation's outputs: a choice task's side answer stays with its scoring (hf)."""
    return opts.backend == "vllm" and task.kind != "choice"


def items_sha256(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def subset(items: list[Item], limit: int | None, seed: int | None) -> list[Item]:
    """The first ``limit`` items, or with a seed ``limit`` items drawn with that seed (kept in order)."""
    if not limit or limit >= len(items):
        return items
    if seed is None:
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def model_input(formatter: PromptFormatter, task: Task, item: Item) -> str:
    """The exact text the model reads for ``item``: the formatted evaluation prompt, then the task's answer cue for
    this format joined as Open-Instruct joins it (no space after a newline or space, one space otherwise). Where the
    task limits an input's tokens (Open-Instruct's MMLU: 2,048), demonstrations are dropped one at a time, as the
    official loop drops them, until the text fits; a prompt over the limit even without any is kept."""
    limit = task.input_token_limit(formatter.mode)
    prompts = [task.eval_prompt(item, formatter.mode)]
    if limit is not None:
        prompts += task.fewer_shot_prompts(item, formatter.mode)
    cue = task.answer_cue(item, formatter.mode)
    for prompt in prompts:
        text = formatter.prompt_text(prompt)
        if cue:
            text += cue if text[-1:] in ("\n", " ") else " " + cue
        if limit is None or len(formatter.tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit:
            break
    return text


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _generate_outputs(
    model: Any,
    formatter: PromptFormatter,
    texts: list[str],
    task: Task,
    opts: EvalOptions,
    advance: Any,
    n: int = 1,
    temperature: float = 0.0,
) -> tuple[tuple[list[str], int], int]:
    """Batched generation of ``n`` outputs per model input (each tokenised once) with the task's stop strings for this
    format; progress advances in items. Returns ((outputs, generated tokens), batch size used)."""
    prompts = [ids for text in texts for ids in [formatter.encode_text(text)] * n]
    if vllm_generates(opts, task):
        from pktransfer.evaluation import vllm_backend

        if opts.vllm_source is None:
            raise ValueError("backend vllm needs the folder of the evaluated weights (EvalOptions.vllm_source)")
        eng = vllm_backend.engine(opts.vllm_source, opts.vllm_dtype, opts.vllm_max_model_len, opts.seed)
        out = vllm_backend.generate(
            eng,
            prompts,
            max_new_tokens=opts.max_new_tokens,
            stop_token_ids=formatter.stop_token_ids(),
            stop_strings=task.stop_strings_for(formatter.mode),
            temperature=temperature,
            top_p=opts.top_p,
        )
        advance(len(texts))
        return out, len(prompts)
    return run_batched(
        model,
        opts.batch_size,
        lambda bs: generate(
            model,
            formatter.tokenizer,
            prompts,
            batch_size=bs,
            max_new_tokens=opts.max_new_tokens,
            stop_token_ids=formatter.stop_token_ids(),
            stop_strings=task.stop_strings_for(formatter.mode),
            temperature=temperature,
            top_p=opts.top_p,
            on_batch=lambda k, _t: advance(k / n),
        ),
    )


def _generate_kind(
    model: Any, formatter: PromptFormatter, items: list[Item], task: Task, opts: EvalOptions, advance: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    texts = [model_input(formatter, task, it) for it in items]
    (outputs, n_tokens), used = _generate_outputs(model, formatter, texts, task, opts, advance)
    records, extra = [], defaultdict(list)
    for it, text, out in zip(items, texts, outputs, strict=True):
        s = task.score(out, it)
        for k, v in s.get("metrics", {}).items():
            extra[k].append(float(v))
        records.append(
            {
                "id": it.id,
                "prompt": task.eval_prompt(it, formatter.mode),
                "model_input": text,
                "output": out,
                "extracted": s["extracted"],
                "reference": it.reference,
                "correct": bool(s["correct"]),
                **({"metrics": s["metrics"]} if "metrics" in s else {}),
                **{k: v for k, v in s.items() if k not in ("extracted", "correct", "metrics")},
            }
        )
    return records, {"metrics": {k: _mean(v) for k, v in extra.items()}, "generated_tokens": n_tokens, "batch_size_used": used}


def _choice_kind(
    model: Any, formatter: PromptFormatter, items: list[Item], task: Task, opts: EvalOptions, advance: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    tok = formatter.tokenizer
    contexts, conts = [], []
    texts = []
    for it in items:
        text = model_input(formatter, task, it)
        texts.append(text)
        # right after a chat template's assistant header the answer starts the turn: no leading space
        at_turn_start = formatter.mode in ("chat", "tulu") and text.endswith("\n")
        choices = [c.lstrip() if at_turn_start else c for c in it.metadata["choices"]]
        pairs = [encode_pair(tok, text, c, add_special_tokens=formatter.mode == "tulu") for c in choices]
        contexts.append(pairs[0][0])
        conts.append([p[1] for p in pairs])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    steps = 2 if task.choice_generates else 1  # progress: scoring, then the greedy answers
    ll, used = run_batched(
        model,
        opts.batch_size,
        lambda bs: continuation_logliks(model, contexts, conts, batch_size=bs, pad_id=pad, on_batch=lambda k: advance(k / steps)),
        start=32,
    )
    greedy: list[str] | None = None
    if task.choice_generates:
        (greedy, _n), _used = _generate_outputs(model, formatter, texts, task, opts, lambda k: advance(k / steps))
    normed = task.primary_metric() == "acc_norm"
    records, by_subject = [], defaultdict(list)
    for k, (it, text, scores) in enumerate(zip(items, texts, ll, strict=True)):
        letters = [c.strip() for c in it.metadata["choices"]]
        pred = letters[max(range(len(scores)), key=lambda j: scores[j])]
        rec: dict[str, Any] = {
            "id": it.id,
            "prompt": it.prompt,
            "model_input": text,
            "output": None,
            "loglik": dict(zip(letters, scores, strict=True)),
        }
        if task.choice_generates:
            pred_norm = letters[max(range(len(scores)), key=lambda j: scores[j] / len(letters[j].encode()))]
            gold = scores[letters.index(it.reference)]
            s = task.score(greedy[k], it)  # type: ignore[index]
            rec.update(
                output=greedy[k],  # type: ignore[index]
                extracted_sum=pred,
                extracted_norm=pred_norm,
                correct_sum=pred == it.reference,
                correct_norm=pred_norm == it.reference,
                margin=gold - max(v for j, v in enumerate(scores) if letters[j] != it.reference),
                greedy=s["extracted"],
                greedy_correct=bool(s["correct"]),
            )
            pred = pred_norm if normed else pred
        ok = pred == it.reference
        subject = it.metadata.get("subject", "all")
        by_subject[subject].append(float(ok))
        rec.update(extracted=pred, reference=it.reference, correct=ok, subject=subject)
        records.append(rec)
    per_subject = {s: {"n": len(v), "accuracy": _mean(v)} for s, v in sorted(by_subject.items())}
    letters = list(dict.fromkeys(c.strip() for it in items for c in it.metadata["choices"]))
    extra_metrics: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if task.choice_generates:
        extra_metrics = {
            "acc": _mean([float(r["correct_sum"]) for r in records]),
            "acc_norm": _mean([float(r["correct_norm"]) for r in records]),
            "exact_match": _mean([float(r["greedy_correct"]) for r in records]),
        }
        margins = sorted(r["margin"] for r in records)
        extra["margin"] = {"mean": _mean(margins), "median": margins[len(margins) // 2] if margins else 0.0}
    return records, {
        # how often each answer is predicted and is right: a model that leans on one letter shows it here
        "predicted": {L: sum(r["extracted"] == L for r in records) for L in letters},
        "reference_counts": {L: sum(r["reference"] == L for r in records) for L in letters},
        "metrics": {
            "acc,micro": _mean([float(r["correct"]) for r in records]),
            "acc,macro": _mean([v["accuracy"] for v in per_subject.values()]),
            **extra_metrics,
        },
        **extra,
        "per_subject": per_subject,
        "batch_size_used": used,
    }


def _code_kind(
    model: Any, formatter: PromptFormatter, items: list[Item], task: Any, opts: EvalOptions, advance: Any, progress: Progress
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from pktransfer.data.scoring import pass_at_k
    from pktransfer.evaluation.sandbox import (
        SandboxLimits,
        describe_isolation,
        isolation_of,
        isolation_warning,
        require_opt_in,
        run_programs,
        sandbox_plan,
    )

    require_opt_in(opts.allow_code_execution, f"task '{task.name}'")
    isolation = isolation_of(sandbox_plan())
    progress.log(describe_isolation(isolation))
    if warning := isolation_warning(isolation):
        progress.warn(warning)
    n = opts.n_samples
    temperature = opts.temperature if n > 1 else 0.0
    torch.manual_seed(opts.seed)
    texts = [model_input(formatter, task, it) for it in items]
    (outputs, n_tokens), used = _generate_outputs(model, formatter, texts, task, opts, advance, n, temperature)
    programs = [task.program(items[i // n], out, formatter.mode) for i, out in enumerate(outputs)]
    with progress.task(f"sandbox: {len(programs)} programs", total=len(programs)) as tick:
        results = run_programs(programs, SandboxLimits(timeout=opts.sandbox_timeout), on_done=lambda: tick(1))
    ks = [k for k in (1, 10, 100) if k <= n]
    records, per_k = [], defaultdict(list)
    for i, it in enumerate(items):
        res = results[i * n : (i + 1) * n]
        c = sum(r.passed for r in res)
        for k in ks:
            per_k[f"pass@{k}"].append(pass_at_k(n, c, k))
        records.append(
            {
                "id": it.id,
                "prompt": task.eval_prompt(it, formatter.mode),
                "model_input": texts[i],
                "output": outputs[i * n] if n == 1 else outputs[i * n : (i + 1) * n],
                "extracted": programs[i * n] if n == 1 else None,
                "reference": it.reference,
                "correct": pass_at_k(n, c, 1) == 1.0 if n == 1 else c > 0,
                "n_samples": n,
                "n_passed": c,
                "execution": [{"status": r.status, "reason": r.reason, "stderr": r.stderr[-500:]} for r in res],
            }
        )
    return records, {
        "metrics": {k: _mean(v) for k, v in per_k.items()},
        "generated_tokens": n_tokens,
        "sandbox": {
            "isolation": isolation,
            "timeout_s": opts.sandbox_timeout,
            "pass_means": "the runner's completion token arrived: the tests returned normally",
        },
        "sampling": {"n": n, "temperature": temperature, "top_p": opts.top_p if temperature > 0 else None, "seed": opts.seed},
        "batch_size_used": used,
    }


def evaluate_items(
    model: Any,
    formatter: PromptFormatter,
    items: list[Item],
    *,
    label: str,
    task: Task,
    split: str,
    options: EvalOptions | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    opts = options or EvalOptions()
    progress = progress or Progress(quiet=True)
    formatter = formatter.for_evaluation()
    items = subset(items, opts.limit, opts.subset_seed)
    t0 = time.perf_counter()
    with progress.task(f"eval {label} on {task.name}/{split}", total=len(items)) as advance:
        if task.kind == "choice":
            records, extra = _choice_kind(model, formatter, items, task, opts, advance)
        elif task.kind == "code":
            records, extra = _code_kind(model, formatter, items, task, opts, advance, progress)
        else:
            records, extra = _generate_kind(model, formatter, items, task, opts, advance)
    seconds = time.perf_counter() - t0
    n_correct = sum(bool(r["correct"]) for r in records)
    primary = task.primary_metric() or {"choice": "acc,micro", "code": "pass@1"}.get(task.kind)
    accuracy = extra["metrics"][primary] if primary in extra.get("metrics", {}) else n_correct / len(items)
    tokens = extra.pop("generated_tokens", None)
    summary = {
        "label": label,
        "task": task.name,
        "eval_name": getattr(task, "eval_name", task.name),
        "split": split,
        "n": len(items),
        "correct": n_correct,
        "accuracy": accuracy,
        "scorer": task.scorer,
        **extra,
        "protocol": {
            "decoding": "greedy" if task.kind != "code" or opts.n_samples == 1 else "sampled",
            **({"backend": "vllm", "vllm_source": opts.vllm_source} if vllm_generates(opts, task) else {}),
            "max_new_tokens": opts.max_new_tokens if task.kind != "choice" or task.choice_generates else None,
            "batch_size": opts.batch_size,
            "prompt_format": formatter.describe(),
            "limit": opts.limit,
            "subset_seed": opts.subset_seed,
            **task.protocol(),
            **task.format_protocol(formatter.mode),
        },
        "data_sha256": items_sha256(items),
        "data_source": task.data_source(split),
        "seconds": round(seconds, 2),
        "items_per_second": round(len(items) / seconds, 3) if seconds else None,
        "generated_tokens": tokens,
        "generated_tokens_per_second": round(tokens / seconds, 2) if tokens and seconds else None,
    }
    return EvalResult(label, task.name, split, summary, records)
