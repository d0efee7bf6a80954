"""Held-out text never reaches a model on the student side: a check on every input a model reads.

A task can hold strings back from everything a method does before evaluation (``Task.held_out_strings``: the planted
task's B people, whose facts only the planted teacher may hold). While a method prepares and trains, every forward
pass of every model of the run (the student, the teacher, a generation step) passes through the model's input
embedding; a pre-hook there decodes the token ids and fails the run with one clear error if a held-out string is in
them. Evaluation, which asks the held-out facts on purpose, runs with the check off.

The check reads what the models really read, whatever path a method takes to them (training batches, teacher caches,
Seeking's sensitivity items, LaTen's extract items, SemAlign's activations, KD's and GKD's teacher queries), so a
method cannot leak by a path the task's splits do not cover.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pktransfer.errors import DataError


class LeakGuard:
    """Watches models' inputs for held-out strings while :meth:`active`. Without strings it watches nothing."""

    def __init__(self, held_out: list[str], source: str) -> None:
        self.held_out = sorted(set(held_out))
        self.source = source
        self._pattern = re.compile("|".join(re.escape(s) for s in self.held_out)) if self.held_out else None
        self._on: str | None = None  # the stage being watched, or None
        self.inputs_checked = 0

    def watch(self, model: Any, tokenizer: Any, role: str) -> None:
        """Check every input of ``model`` (decoded with ``tokenizer``) while the guard is active."""
        if self._pattern is None or model is None:
            return
        embed = model.get_input_embeddings()

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._on is None:
                return
            ids = args[0] if args else kwargs.get("input")
            if isinstance(ids, torch.Tensor) and ids.dtype in (torch.long, torch.int):
                self.check(tokenizer.batch_decode(ids.reshape(-1, ids.shape[-1]).tolist()), role)

        embed.register_forward_pre_hook(hook, with_kwargs=True)

    def check(self, texts: list[str], role: str) -> None:
        self.inputs_checked += len(texts)
        for text in texts:
            m = self._pattern.search(text) if self._pattern is not None else None
            if m is not None:
                raise DataError(
                    f"held-out text reached the {role} while the method was in '{self._on}': '{m.group(0)}' "
                    f"({self.source}) is in a model input: ...{text[max(0, m.start() - 60) : m.end() + 20]!r}...",
                    hint="the student side may only read the task's training-side splits (train, seed, extract, align); "
                    "check the method's items and the task's splits",
                )

    @contextmanager
    def active(self, stage: str | None) -> Iterator[None]:
        """Check inputs during the block (``None``: pause the check, e.g. for a learning curve's evaluation)."""
        before, self._on = self._on, stage
        try:
            yield
        finally:
            self._on = before

    def report(self) -> dict[str, Any]:
        """What run.json records (``leak_guard``: how many held-out strings were watched for, in how many model
        inputs); nothing for a guard that watches nothing."""
        if self._pattern is None:
            return {}
        return {"leak_guard": {"held_out_strings": len(self.held_out), "model_inputs_checked": self.inputs_checked, "found": 0}}


def guard_for(task: Any) -> LeakGuard:
    """The guard a run on ``task`` needs (one that watches nothing for a task that holds nothing back)."""
    return LeakGuard(task.held_out_strings(), f"held out by task '{task.name}'")
