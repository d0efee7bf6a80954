"""Task registry and the one item format every task produces.

A task yields :class:`Item` objects (prompt, response to train on, reference to score against,
metadata) for named splits: ``train`` and ``test`` always, and ``seed`` / ``extract`` / ``align`` for
methods that locate knowledge in the teacher. Tasks are registered by name (``@register_task``) and
built from the recipe's ``task`` section.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pktransfer.errors import DataError, RecipeError

SPLITS = ("seed", "extract", "align", "train", "test")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    response: str
    reference: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "response": self.response,
            "reference": self.reference,
            "metadata": self.metadata,
        }


class Task(ABC):
    """A named task. Subclasses implement :meth:`_load`; the base class checks and caches splits."""

    name: str = ""
    description: str = ""
    scorer: str = "exact_match_number"
    system_prompt: str | None = None
    max_new_tokens: int | None = None  # a sensible generation budget, if the task knows one
    # how it is evaluated: "generate" (greedy text, scored by ``score``), "choice" (log-likelihood of
    # each item's metadata["choices"] continuations), "code" (generated program run against tests)
    kind: str = "generate"
    stop_strings: tuple[str, ...] = ()  # generation stops at the first of these (cut from the output)
    plain_separator: str = "\n"  # between prompt and response in the plain format ("" for "...Answer:")
    # choice tasks: also record a short greedy answer (scored by ``score``), the length-normalised prediction and the
    # gold choice's log-likelihood margin over the best other choice
    choice_generates: bool = False

    def primary_metric(self) -> str | None:
        """The summary metric that is the task's accuracy (None: the kind's own, e.g. choice tasks' acc,micro)."""
        return None

    def held_out_strings(self) -> list[str]:
        """Strings no text a method hands to a model while it prepares or trains may contain (``pktransfer.leakguard``);
        [] for tasks that hold nothing back from the student side."""
        return []

    def score(self, output: str, item: Item) -> dict[str, Any]:
        """Per-item scores: ``extracted``, ``correct`` (the primary metric) and optional other ``metrics``."""
        from pktransfer.data.scoring import SCORERS

        pred, ok = SCORERS[self.scorer](output, item.reference)
        return {"extracted": pred, "correct": ok}

    def protocol(self) -> dict[str, Any]:
        """What a reader needs to reproduce the numbers (shots, template, filters); saved in summaries."""
        return {"kind": self.kind, "scorer": self.scorer, "stop_strings": list(self.stop_strings)}

    # Evaluation may depend on the prompt format ("chat" or "plain"): a completion-style benchmark asks an
    # instruct model differently. The defaults use the item's prompt and the task's stop strings as they are.
    def eval_prompt(self, item: Item, mode: str) -> str:
        return item.prompt

    def stop_strings_for(self, mode: str) -> tuple[str, ...]:
        return self.stop_strings

    def answer_cue(self, item: Item, mode: str) -> str:
        """Text put after the formatted prompt (after the assistant header in chat and tulu formats), e.g.
        Open-Instruct's "Answer:"; empty for most protocols."""
        return ""

    def input_token_limit(self, mode: str) -> int | None:
        """The most tokens a model input may have (the formatted prompt with its cue, counted without added special
        tokens); a longer one is replaced by the first of :meth:`fewer_shot_prompts` that fits. None: no limit."""
        return None

    def fewer_shot_prompts(self, item: Item, mode: str) -> list[str]:
        """The item's evaluation prompt with one demonstration fewer, two fewer, ... down to none; [] without any."""
        return []

    def format_protocol(self, mode: str) -> dict[str, Any]:
        """The format-dependent part of :meth:`protocol` (stop strings, template)."""
        return {"stop_strings": list(self.stop_strings_for(mode))}

    def __init__(self, params: dict[str, Any] | None = None, data_dir: str | None = None) -> None:
        self.params = dict(params or {})
        self.data_dir_option = data_dir
        self._cache: dict[str, list[Item]] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def split(self, name: str) -> list[Item]:
        if name not in self.splits:
            raise DataError(f"task '{self.name}' has no split '{name}'", hint=f"available splits: {', '.join(self.splits)}")
        if name not in self._cache:
            items = self._load(name)
            if not items:
                raise DataError(
                    f"task '{self.name}': split '{name}' is empty", hint="check the task's data files and size parameters"
                )
            self._cache[name] = items
        return self._cache[name]

    @abstractmethod
    def _load(self, split: str) -> list[Item]: ...

    def choice_param(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        """A string parameter restricted to ``allowed``: one error naming the task, the key and the choices."""
        value = self.params.get(key, default)
        if value not in allowed:
            raise RecipeError(f"{self.name}: {key}={value!r}", hint=f"use one of {', '.join(map(repr, allowed))}")
        return str(value)

    def tunes_on_own_validation(self) -> bool:
        """Whether ``task.validation`` takes this task's own ``validation`` split (else the end of its train split)."""
        return "validation" in self.splits

    def data_dir(self) -> Path:
        return resolve_data_dir(self.data_dir_option)

    def data_files(self, split: str) -> list[str]:
        """The data files (relative to the data folder) a split reads; [] for tasks that need none."""
        return []

    def data_path(self, rel: str) -> Path:
        """``rel`` in the data folder; in pktransfer's cache a missing file is prepared from its public source."""
        from pktransfer.data.sources import data_cache, prepare_file

        root = self.data_dir()
        if root == data_cache() and not (root / rel).is_file():
            return prepare_file(root, rel)
        return root / rel

    def data_source(self, split: str) -> dict[str, Any] | None:
        """Where the split's files came from (a local folder, or the cache with the hub id / paper commit)."""
        files = self.data_files(split)
        if not files:
            return None
        from pktransfer.data.sources import data_cache, describe_file

        root = self.data_dir()
        return {rel: describe_file(root, rel, root == data_cache()) for rel in files}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scorer": self.scorer, "params": self.params, "splits": list(self.splits)}


TaskFactory = Callable[[dict[str, Any], str | None], Task]
_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def task_classes() -> dict[str, type[Task]]:
    return dict(_REGISTRY)


def get_task(name: str, params: dict[str, Any] | None = None, data_dir: str | None = None) -> Task:
    if name not in _REGISTRY:
        raise RecipeError(f"unknown task '{name}'", hint=f"available tasks: {', '.join(task_names())}")
    return _REGISTRY[name](params, data_dir)


def resolve_data_dir(explicit: str | None = None) -> Path:
    """The benchmark data folder: the explicit option (``task.data_dir``), ``$PKT_DATA_DIR``, else pktransfer's data
    cache (filled from public sources, see :mod:`pktransfer.data.sources`)."""
    env = os.environ.get("PKT_DATA_DIR")
    for cand, label in ((explicit, "task.data_dir"), (env, "$PKT_DATA_DIR")):
        if cand:
            p = Path(cand).expanduser()
            if p.is_dir():
                return p
            raise DataError(
                f"data folder '{p}' (from {label}) does not exist",
                hint=f"point {label} at the folder holding gsm8k/, mmlu/, seeking/, laten/",
            )
    from pktransfer.data.sources import data_cache

    return data_cache()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(
            f"data file '{path}' is missing",
            hint=f"expected it under {path.parent}; set PKT_DATA_DIR or task.data_dir to a folder that holds "
            "it, or leave both unset so that `pkt data fetch TASK` prepares it in pktransfer's cache",
        )
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"data file '{path}' is not UTF-8 text (byte {err.start})", hint="convert the file to UTF-8 JSON lines"
        ) from None
    except OSError as err:
        raise DataError(
            f"data file '{path}' cannot be read: {err.strerror or err}", hint="check the file's permissions"
        ) from None
    for n, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028: split on newlines only
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file '{path}' line {n} is not valid JSON ({err.msg})", hint="repair or replace the file"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"data file '{path}' line {n} is not a JSON object", hint="one object per line")
        rows.append(row)
    return rows


def train_and_validation(task: Task, n_train: int | None, n_validation: int | None) -> tuple[list[Item], list[Item]]:
    """The training items and the validation items, disjoint.

    A task with its own ``validation`` split gives its first ``n_validation`` items. Otherwise the last
    ``n_validation`` items of the train split are carved off (deterministic: the split's order is fixed by
    the task's data or its seed), and training takes its first ``n_train`` items from what is left, so the
    training items are the same as without validation whenever the split is long enough.
    """
    train = task.split("train")
    if not n_validation:
        return (train[:n_train] if n_train else train), []
    if task.tunes_on_own_validation():
        val = task.split("validation")[:n_validation]
    else:
        if n_validation >= len(train):
            raise DataError(
                f"task '{task.name}': task.validation {n_validation} would take the whole train split ({len(train)} items)",
                hint="lower task.validation (a few dozen items are enough to choose a learning rate)",
            )
        train, val = train[: len(train) - n_validation], train[len(train) - n_validation :]
    train = train[:n_train] if n_train else train
    overlap = {it.id for it in train} & {it.id for it in val}
    if overlap:
        raise DataError(
            f"task '{task.name}': {len(overlap)} validation items are also training items (e.g. '{sorted(overlap)[0]}')",
            hint="use a task whose validation split is disjoint from train, or carve it from train (no own split)",
        )
    return train, val
