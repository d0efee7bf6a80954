"""Stopping cleanly on SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C).

While a run holds its folder, both signals are turned into :class:`Stopped` (a ``BaseException``, like
``KeyboardInterrupt``), which the run folder records in ``FAILED.json`` with the reason before its claim is
released. During training the stop is deferred to the end of the current optimizer step: the trainer then saves
a checkpoint and stops (``StopCallback``), so the next start resumes from that step. A second signal while a stop
is deferred stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Stopped(BaseException):
    """The process was asked to stop (SIGTERM or SIGINT)."""

    def __init__(self, signame: str) -> None:
        super().__init__(f"stopped by {signame}; rerun the same command to resume")
        self.signame = signame


_state: dict[str, Any] = {"pending": None, "deferring": 0}


def pending() -> str | None:
    """The name of a signal that asked to stop and has not been acted on yet."""
    return _state["pending"]


def _handler(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _state["deferring"] and _state["pending"] is None:
        _state["pending"] = name  # the training loop checkpoints and stops at the end of this step
        return
    _state["pending"] = None
    raise Stopped(name)


@contextmanager
def stop_cleanly() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Stopped` inside the block (main thread only; the previous handlers
    come back afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state["pending"] = None


@contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a signal only marks a stop as pending (see ``StopCallback``); at its end a pending stop
    raises :class:`Stopped`."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    name = _state["pending"]
    if name is not None and not _state["deferring"]:
        _state["pending"] = None
        raise Stopped(name)


def stop_callback() -> Any:
    """A ``TrainerCallback``: when a stop is pending at the end of a step, save a checkpoint there and stop."""
    from transformers import TrainerCallback

    class StopCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if pending() is not None:
                control.should_save = True
                control.should_training_stop = True

    return StopCallback()
