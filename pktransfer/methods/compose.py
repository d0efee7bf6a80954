"""A transfer composed of a teacher-derived *start* and a teacher *objective*, chosen independently.

Every method is a start (where the LoRA begins: ``lora``, ``pissa``, ``seeking``, ``weight_selection``), an
objective (what the LoRA is trained toward: ``kd``, ``gkd``, ``hidden_kd``), or neither (SemAlign and LaTen,
whose starts and objectives are bound to each other). A composed recipe names one of each:

    method:
      name: compose
      start: {name: seeking, structure: submatrix}
      objective: {name: gkd, lmbda: 0.5}

The start's ``prepare`` builds the student exactly as the start alone would (Seeking's step-0 identity
included), then the objective's ``setup_objective`` prepares its loss for that student; training runs the
objective's loss, batch rewrite and callbacks; the adapter is saved the start's way (rebased onto the
unmodified student when the start moved weights out of the base). ``{start: lora, objective: kd}`` trains
exactly what ``kd`` alone trains. A new start or objective is its own method file and registry line: this
file names none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pktransfer.config import MethodConfig
from pktransfer.methods import registry
from pktransfer.methods.base import Method, MethodContext, SharedWork
from pktransfer.training import BatchFn, LossFn


class ComposeConfig(MethodConfig):
    """A teacher-derived start (a registered start's config) trained toward an objective (a registered objective's
    config); e.g. start: {name: seeking}, objective: {name: gkd}."""

    role_fields: ClassVar[dict[str, str]] = {"start": "start", "objective": "objective"}
    name: Literal["compose"] = "compose"
    start: MethodConfig  # rebuilt as the registered starts' union (config.register_config)
    objective: MethodConfig  # rebuilt as the registered objectives' union

    def label(self) -> str:
        return f"{self.start.label()}+{self.objective.label()}"


class ComposeMethod(Method):
    config_class = ComposeConfig
    teacher_use = "composed"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.start = registry.create(spec.start)
        self.objective: Any = registry.create(spec.objective)
        self.needs_teacher = self.start.needs_teacher or self.objective.needs_teacher  # type: ignore[misc]

    @property
    def teacher_during_training(self) -> bool:
        return self.objective.teacher_during_training

    def prepare(self, ctx: MethodContext) -> Any:
        model = self.start.prepare(ctx)
        self.initial_lora = self.start.initial_lora
        self.objective.setup_objective(ctx, model)
        return model

    def training_loss(self, ctx: MethodContext) -> LossFn | None:
        return self.objective.training_loss(ctx)

    def training_batch(self, ctx: MethodContext) -> BatchFn | None:
        return self.objective.training_batch(ctx)

    def callbacks(self, ctx: MethodContext) -> list[Any]:
        return [*self.start.callbacks(ctx), *self.objective.callbacks(ctx)]

    def finish_training(self) -> None:
        self.start.finish_training()
        self.objective.finish_training()

    def spent(self) -> dict[str, Any]:
        return {**self.start.spent(), **self.objective.spent()}

    def report(self) -> dict[str, Any]:
        return {
            "start": {"name": self.start.name, **self.start.report()},
            "objective": {"name": self.objective.name, **self.objective.report()},
        }

    def saves_merged(self) -> bool:
        return self.start.saves_merged()

    def single_process_only(self) -> tuple[str, str] | None:
        return self.start.single_process_only() or self.objective.single_process_only()

    def save_adapter(self, model: Any, folder: Path) -> None:
        self.start.save_adapter(model, folder)

    @classmethod
    def shared_work(cls, recipe: Any, shared_root: Path) -> SharedWork:
        """Each part's shared caches, as the part alone would share them (a Seeking start reuses the sensitivity
        every Seeking cell of the grid uses)."""
        spec = recipe.method
        jobs: list[tuple[str, Any, str]] = []
        parts = {}
        for field in ("start", "objective"):
            part = getattr(spec, field)
            shared = registry.method_class(part.name).shared_work(recipe.model_copy(update={"method": part}), shared_root)
            parts[field] = shared.recipe.method
            jobs += shared.jobs
        return SharedWork(recipe.model_copy(update={"method": spec.model_copy(update=parts)}), jobs)

    @classmethod
    def report_notes(cls, labels: list[str]) -> list[str]:
        return [
            f"{', '.join(labels)}: composed transfers, a start (where the LoRA begins) trained toward an objective "
            "(what it is trained toward); each part runs exactly as it does alone."
        ]
