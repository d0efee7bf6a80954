"""Tasks read from local JSONL files: the benchmark data layout (``$PKT_DATA_DIR``) and user-supplied files.

Two row layouts are understood: chat rows ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``
(the Seeking and LaTen paper data) and flat rows ``{"prompt": ..., "response": ..., "reference": ...}``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from pktransfer.data import open_instruct as oi
from pktransfer.data.tasks import Item, Task, read_jsonl, register_task
from pktransfer.errors import DataError, RecipeError

_GSM_PROMPT = "Answer the following question.\n\nQuestion: {question}"
_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?(-?[\d,]*\.?\d+)", re.IGNORECASE)


def gsm_reference(text: str) -> str:
    """Final answer of a GSM8K solution: after '####', else after 'the answer is'."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    m = list(_ANSWER_IS.finditer(text))
    if not m:
        raise ValueError("no final answer")
    return m[-1].group(1).replace(",", "")


def row_to_item(row: dict[str, Any], idx: int, path: Path, reference_fn: Any = None) -> Item:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            raise DataError(
                f"'{path}' row {idx + 1}: 'messages' must be a list of {{role, content}} objects",
                hint='write e.g. "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
            )
        user = [m["content"] for m in msgs if m.get("role") == "user"]
        assistant = [m["content"] for m in msgs if m.get("role") == "assistant"]
        if not user or not assistant:
            raise DataError(f"'{path}' row {idx + 1}: messages need a user and an assistant turn", hint="fix the row")
        prompt, response = user[0], assistant[0]
    elif "prompt" in row:
        prompt, response = row["prompt"], row.get("response", row.get("reference", ""))
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"'{path}' row {idx + 1}: 'prompt' and 'response' must be strings", hint="fix the row")
    else:
        raise DataError(
            f"'{path}' row {idx + 1} has neither 'messages' nor 'prompt'",
            hint="rows must be chat ({messages: [...]}) or flat ({prompt, response, reference})",
        )
    reference = row.get("reference")
    if reference is None:
        try:
            reference = reference_fn(response) if reference_fn else response
        except ValueError:
            raise DataError(
                f"'{path}' row {idx + 1}: cannot find the final answer in the response", hint="add a 'reference' field to the row"
            ) from None
    meta = {k: v for k, v in row.items() if k not in ("messages", "prompt", "response", "reference")}
    return Item(
        id=str(row.get("id", f"{path.stem}-{idx}")), prompt=prompt, response=response, reference=str(reference), metadata=meta
    )


@register_task
class Gsm8kTask(Task):
    """GSM8K: test = the official 1,319 test questions; train/seed/extract/align = the papers' GSM8K-train subsets.

    ``params.shots``: 0 (default) or 8 fixed exemplars, the first 8 solutions of GSM8K train.
    ``params.train_source``: ``seeking`` (Seeking's gsm_data_1000, default) or ``laten`` (LaTen's gsm_train_split).
    ``params.style``: ``instruct`` (default; "Answer the following question." for chat models),
    ``lm-eval`` (lm-eval's "Question: ...\nAnswer:" template, stop at "Question:"; use with
    prompt_format: plain to reproduce lm-eval's gsm8k numbers) or ``open-instruct`` (Seeking's evaluation:
    Open-Instruct's 8 chain-of-thought exemplars of Wei et al. by default, "Answer:" after the assistant header,
    512 new tokens, a newline stops plain-format generation, the last number scored by case- and
    punctuation-blind exact match; :mod:`pktransfer.data.open_instruct`). Scores: ``flexible`` (the last number,
    primary) and ``strict`` (the number after "#### "); ``open-instruct`` scores its own way.
    """

    name = "gsm8k"
    description = "GSM8K: paper train subsets, official test; 0/8-shot, strict + flexible match"
    scorer = "exact_match_number"
    max_new_tokens = 256
    FILES: ClassVar[dict[str, str]] = {
        "train": "seeking/gsm/gsm_data_1000.jsonl",
        "seed": "seeking/gsm/sample_gsm.jsonl",
        "extract": "laten/gsm/gsm_extract_split.jsonl",
        "align": "laten/gsm/gsm_align_split.jsonl",
        "test": "gsm8k/test.jsonl",
    }
    EXEMPLARS = "gsm8k/train.jsonl"
    EXTRA_FILES = (EXEMPLARS,)  # the 8-shot exemplars

    TRAIN_SOURCES: ClassVar[dict[str, str]] = {
        "seeking": "seeking/gsm/gsm_data_1000.jsonl",
        "laten": "laten/gsm/gsm_train_split.jsonl",
    }

    def __init__(self, params: dict[str, Any] | None = None, data_dir: str | None = None) -> None:
        super().__init__(params, data_dir)
        source = self.choice_param("train_source", tuple(self.TRAIN_SOURCES), "seeking")
        self.FILES = {**self.FILES, "train": self.TRAIN_SOURCES[source]}
        self.style = self.choice_param("style", ("instruct", "lm-eval", "open-instruct"), "instruct")
        self.shots = self.params.get("shots", 8 if self.style == "open-instruct" else 0)
        if self.shots not in (0, 8) and not (isinstance(self.shots, int) and 0 <= self.shots <= 16):
            raise RecipeError(f"gsm8k: shots={self.shots!r}", hint="use 0 or 8 (any 0-16 works)")
        if self.style == "open-instruct":
            self.plain_separator = ""
            self.max_new_tokens = oi.GSM_MAX_NEW_TOKENS
        if self.style == "lm-eval":
            self.plain_separator = ""
            self.stop_strings = ("Question:", "</s>", "<|im_end|>")

    def _test_prompt(self, question: str, shots: str) -> str:
        if self.style == "open-instruct":
            return oi.gsm_user_content(question, self.shots)
        if self.style == "lm-eval":
            return f"{shots}Question: {question}\nAnswer:"
        return (
            _GSM_PROMPT.format(question=question)
            if not shots
            else "Answer the following question.\n\n" + shots + f"Question: {question}"
        )

    def _load(self, split: str) -> list[Item]:
        path = self.data_path(self.FILES[split])
        rows = read_jsonl(path)
        if split == "test":
            exemplars = read_jsonl(self.data_path(self.EXEMPLARS))[: self.shots] if self.train_exemplars else []
            shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in exemplars)
            return [
                Item(
                    id=f"gsm8k-test-{i}",
                    prompt=self._test_prompt(r["question"], shots),
                    response=r["answer"],
                    reference=oi.gsm_reference(r["answer"]) if self.style == "open-instruct" else gsm_reference(r["answer"]),
                    metadata={"line": i},
                )
                for i, r in enumerate(rows)
            ]
        return [row_to_item(r, i, path, gsm_reference) for i, r in enumerate(rows)]

    @property
    def train_exemplars(self) -> bool:
        """Whether test prompts take their shots from GSM8K train (open-instruct brings its own exemplars)."""
        return bool(self.shots) and self.style != "open-instruct"

    def data_files(self, split: str) -> list[str]:
        return [self.FILES[split]] + ([self.EXEMPLARS] if split == "test" and self.train_exemplars else [])

    # Open-Instruct: the chat formats get "Answer:" after the assistant header; plain text ends "\nAnswer:" and a
    # newline stops generation (non-chat models); chat models stop at their end of turn
    def eval_prompt(self, item: Item, mode: str) -> str:
        return item.prompt + "\nAnswer:" if self.style == "open-instruct" and mode == "plain" else item.prompt

    def answer_cue(self, item: Item, mode: str) -> str:
        return oi.GSM_ANSWER_CUE if self.style == "open-instruct" and mode != "plain" else ""

    def stop_strings_for(self, mode: str) -> tuple[str, ...]:
        if self.style == "open-instruct":
            return ("\n",) if mode == "plain" else ()
        return self.stop_strings

    def score(self, output: str, item: Item) -> dict[str, Any]:
        from pktransfer.data.scoring import exact_match_number, gsm8k_strict

        if self.style == "open-instruct":
            pred = oi.gsm_extract(output)
            ok = oi.exact_match(pred, item.reference)
            return {"extracted": pred, "correct": ok, "metrics": {"exact_match,open-instruct": float(ok)}}

        flex, ok = exact_match_number(output, item.reference)
        strict, strict_ok = gsm8k_strict(output, item.reference)
        return {
            "extracted": flex,
            "correct": ok,
            "metrics": {"exact_match,flexible": float(ok), "exact_match,strict": float(strict_ok)},
            "extracted_strict": strict,
        }

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "shots": self.shots,
            "style": self.style,
            "exemplars": (
                f"open-instruct eval/gsm/examplars.py ({self.shots} chain-of-thought)"
                if self.style == "open-instruct" and self.shots
                else f"first {self.shots} of {self.EXEMPLARS}"
                if self.shots
                else None
            ),
            "filters": {"open-instruct": "last number, exact match ignoring case and punctuation"}
            if self.style == "open-instruct"
            else {
                "flexible": "last number in the output (primary)",
                "strict": "the number after '#### ' (lm-eval strict-match)",
            },
        }


@register_task
class JsonlTask(Task):
    """User-supplied JSONL files, one per split: ``params: {train: a.jsonl, test: b.jsonl, ...}``."""

    name = "jsonl"
    description = "your own JSONL files per split (chat 'messages' rows or flat prompt/response/reference rows)"
    scorer = "exact_match"

    def __init__(self, params: dict[str, Any] | None = None, data_dir: str | None = None) -> None:
        super().__init__(params, data_dir)
        self.scorer = str(self.params.pop("scorer", "exact_match"))
        from pktransfer.data.scoring import SCORERS

        if self.scorer not in SCORERS:
            raise RecipeError(f"task 'jsonl': unknown scorer '{self.scorer}'", hint=f"use one of {', '.join(SCORERS)}")
        self.files = {k: Path(str(v)).expanduser() for k, v in self.params.items()}
        if not self.files:
            raise RecipeError(
                "task 'jsonl' needs files: task.params: {train: PATH, test: PATH}",
                hint="name a JSONL file for each split you use",
            )

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    def _load(self, split: str) -> list[Item]:
        path = self.files[split]
        return [row_to_item(r, i, path) for i, r in enumerate(read_jsonl(path))]


@register_task
class HubTask(Task):
    """A dataset on the Hugging Face hub (online only; needs the ``datasets`` package).

    ``params: {dataset: NAME, config: ..., prompt_field: question, response_field: answer,
    reference_field: ..., splits: {train: train, test: test}}``.
    """

    name = "hub"
    description = "a hub dataset by name (online): fields mapped to prompt/response/reference"
    scorer = "exact_match"

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.params.get("splits", {"train": "train", "test": "test"}))

    def _load(self, split: str) -> list[Item]:
        try:
            import datasets
        except ImportError:
            raise DataError("task 'hub' needs the 'datasets' package", hint="pip install 'pktransfer[hub]'") from None
        p = self.params
        if "dataset" not in p:
            raise RecipeError("task 'hub' needs task.params.dataset", hint="e.g. dataset: openai/gsm8k")
        hub_split = p.get("splits", {"train": "train", "test": "test"})[split]
        try:
            ds = datasets.load_dataset(p["dataset"], p.get("config"), split=hub_split)
        except Exception as err:  # network, missing dataset or split
            raise DataError(
                f"could not load hub dataset '{p['dataset']}' split '{hub_split}': {err}",
                hint="check the name and your connection, or use task 'jsonl' with local files",
            ) from None
        pf, rf = p.get("prompt_field", "prompt"), p.get("response_field", "response")
        ref_field = p.get("reference_field")
        return [
            Item(
                id=f"{p['dataset']}-{hub_split}-{i}",
                prompt=str(r[pf]),
                response=str(r[rf]),
                reference=str(r[ref_field]) if ref_field else str(r[rf]),
            )
            for i, r in enumerate(ds)
        ]
