"""What every method provides: build the PEFT student (its initialisation) and, optionally, a loss.

The training loop, data and evaluation are shared (``pktransfer.training``, ``pktransfer.evaluation``),
so methods compared in one recipe differ only in what they implement here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pktransfer.data import PromptFormatter, Task
from pktransfer.models import LoadedModel
from pktransfer.progress import Progress
from pktransfer.recipe import Recipe


@dataclass
class MethodContext:
    recipe: Recipe
    student: LoadedModel
    task: Task
    formatter: PromptFormatter
    workdir: Path
    progress: Progress
    load_teacher: Callable[[], LoadedModel]


class Method(ABC):
    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    @abstractmethod
    def prepare(self, ctx: MethodContext) -> Any:
        """Return the student wrapped as a ``peft.PeftModel``, initialised the method's way."""

    def compute_loss_func(self, ctx: MethodContext) -> Callable[..., Any] | None:
        return None

    def save_adapter(self, model: Any, folder: Path) -> None:
        """Write a standard PEFT adapter folder loadable on the *unmodified* student."""
        model.save_pretrained(str(folder))
