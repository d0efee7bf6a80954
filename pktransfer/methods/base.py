"""What every method provides: build the PEFT student (its initialisation) and, optionally, a loss.

The training loop, data and evaluation are shared (``pktransfer.training``, ``pktransfer.evaluation``),
so methods compared in one recipe differ only in what they implement here.

Two kinds of method can be composed (``methods/compose.py``): a *start* (``is_start``: ``prepare`` builds the
LoRA student, e.g. Seeking's teacher-SVD start, and it trains with plain cross entropy) and an *objective*
(``is_objective``, an :class:`ObjectiveMethod`: the student starts as a plain LoRA and ``setup_objective``
prepares what its loss needs, e.g. KD's teacher logits). A composed transfer takes the start of one and the
objective of another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pktransfer.data import Example, PromptFormatter, Task
from pktransfer.models import LoadedModel
from pktransfer.progress import Progress
from pktransfer.training import BatchFn, LossFn, check_targets, lora_config

if TYPE_CHECKING:
    from pktransfer.config import MethodConfig
    from pktransfer.recipe import Recipe


@dataclass
class TeacherWork:
    """The teacher compute a method spent in one run, counted where it happens (a cache hit spends none).

    FLOPs follow the usual dense-transformer estimate: 2·N per token for a forward pass, 4·N more per
    token for a backward pass (N = the teacher's parameters)."""

    forward_tokens: int = 0
    backward_tokens: int = 0
    seconds: float = 0.0
    parameters: int = 0
    what: list[str] = field(default_factory=list)
    # the teacher caches this run read or built ({file, built, cost}): their cost is not in the counts above but in
    # the cache's own cost file, shared by every run that reads the cache (see ``teacher_cache.cached_file``)
    caches: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        what: str,
        *,
        forward_tokens: int,
        backward_tokens: int = 0,
        seconds: float = 0.0,
        parameters: int = 0,
        caches: list[dict[str, Any]] | None = None,
    ) -> None:
        if what not in self.what:
            self.what.append(what)
        self.forward_tokens += int(forward_tokens)
        self.backward_tokens += int(backward_tokens)
        self.seconds += float(seconds)
        self.parameters = max(self.parameters, int(parameters))
        for c in caches or []:
            self.cache_used(c["file"], built=c["built"], cost=c.get("cost"))

    def cache_used(self, file: str, *, built: bool, cost: dict[str, Any] | None) -> None:
        """Note a teacher cache this run read (``built``: this run computed it) and the cost its file records."""
        for c in self.caches:
            if c["file"] == file:
                c["built"] = c["built"] or built
                c["cost"] = c["cost"] or cost
                return
        self.caches.append({"file": file, "built": built, "cost": cost})

    def to_dict(self) -> dict[str, Any]:
        out = {
            "forward_tokens": self.forward_tokens,
            "backward_tokens": self.backward_tokens,
            "seconds": round(self.seconds, 2),
            "parameters": self.parameters,
            "flops": 2.0 * self.parameters * self.forward_tokens + 4.0 * self.parameters * self.backward_tokens,
            "what": self.what,
        }
        if self.caches:  # absent for a run that used none, as in records made before caches were counted apart
            out["caches"] = self.caches
        return out


def n_tokens(examples: list[Example]) -> int:
    return sum(len(e.input_ids) for e in examples)


@dataclass
class MethodContext:
    recipe: Recipe
    student: LoadedModel
    task: Task
    formatter: PromptFormatter
    workdir: Path
    progress: Progress
    load_teacher: Callable[[], LoadedModel]
    examples: list[Example] = field(default_factory=list)  # the encoded training split
    teacher_work: TeacherWork = field(default_factory=TeacherWork)  # what the method spends on the teacher
    # a folder for caches keyed by their content, shared by the runs of a grid (``pkt compare`` passes its
    # shared/ folder); None: the run keeps no cache beyond its own folder. What a run computes never depends on it.
    cache_dir: Path | None = None


def snapshot_lora(model: Any) -> dict[str, Any]:
    """The LoRA factors of a PEFT model (copies, on CPU), without peft's extra base embedding weights."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def save_rebased_adapter(model: Any, folder: Path, initial: dict[str, Any]) -> None:
    """Save a LoRA whose start (B0, A0) was subtracted from the base as a plain LoRA on the unmodified base.

    W − s·B0A0 + s·BA = W + s·[B | −B0][A ; A0]: rank 2r with alpha doubled keeps the scaling alpha/r.
    Unlike peft's own conversion this also covers embedding adapters (``lora_embedding_*``).
    """
    import copy

    from pktransfer.fileio import save_safetensors
    from pktransfer.ops.lowrank import rebase_as_plain_lora

    tensors = rebase_as_plain_lora(snapshot_lora(model), initial)
    folder.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(model.peft_config["default"])
    saved.r, saved.lora_alpha = saved.r * 2, saved.lora_alpha * 2
    saved.rank_pattern = {k: 2 * v for k, v in (saved.rank_pattern or {}).items()}
    saved.alpha_pattern = {k: 2 * v for k, v in (saved.alpha_pattern or {}).items()}
    saved.init_lora_weights = True
    saved.inference_mode = True
    saved.save_pretrained(str(folder))
    save_safetensors(tensors, folder / "adapter_model.safetensors")


@dataclass
class SharedWork:
    """What a comparison grid can do once for many cells: the cell's recipe pointed at shared caches, and
    jobs to run before the cells (``(folder, recipe, verb)``: ``pipeline.run_verb(recipe, verb)`` into folder)."""

    recipe: Recipe
    jobs: list[tuple[str, Recipe, str]] = field(default_factory=list)

    @classmethod
    def cache(cls, recipe: Recipe, option: str, folder: Path) -> SharedWork:
        """Point the method option ``option`` at ``folder`` (shared by the grid's cells) unless the recipe set it."""
        if getattr(recipe.method, option) is not None:
            return cls(recipe)
        return cls(recipe.model_copy(update={"method": recipe.method.model_copy(update={option: str(folder)})}))

    @classmethod
    def once(cls, recipe: Recipe, shared_root: Path, prefix: str, what: dict[str, Any], option: str, verb: str) -> SharedWork:
        """One job for every cell whose ``what`` (what the work depends on) is the same: ``verb`` runs once into
        ``shared_root/PREFIX-KEY`` and the method option ``option`` points at its ``option/`` output."""
        from pktransfer.runs import recipe_sha256

        key = recipe_sha256(what)[:12]
        folder = shared_root / f"{prefix}-{key}"
        shared = cls.cache(recipe, option, folder / option)
        shared.jobs.append((str(folder), recipe.model_copy(update={"output_dir": str(folder)}), verb))
        return shared


def needs_seed_split(recipe: Any, task: Task) -> None:
    """A verb's check: the task has a ``seed`` split (the items a method's teacher-side step reads)."""
    task.split("seed")


@dataclass(frozen=True)
class Verb:
    """An extra CLI verb a method offers (``pkt VERB RECIPE``), e.g. Seeking's ``extract`` and ``inject``.

    ``check(recipe, task)`` runs before any folder or model exists; ``run(method, ctx, log)`` does the work
    in the run folder (``ctx.workdir``) and returns what goes into run.json (with ``outputs``)."""

    help: str
    run: Callable[[Any, MethodContext, Any], dict[str, Any]]
    check: Callable[[Recipe, Task], None] = lambda recipe, task: None


C = TypeVar("C", bound="MethodConfig")


class Method(ABC, Generic[C]):
    """A transfer method or baseline. The generic layers (pipeline, comparison, reports) call only these hooks.

    A method module holds its config class (``config_class``, a :class:`~pktransfer.config.MethodConfig`
    whose ``name`` is the method's registered name) and this behaviour, typed on that config."""

    name: ClassVar[str]  # set by the registry from config_class
    config_class: ClassVar[type[MethodConfig]]
    needs_teacher: ClassVar[bool] = False
    # what the method takes from the teacher, for the report's grouping: "none" (teacher-free),
    # "weights" (teacher parameters) or "outputs" (teacher activations or logits)
    teacher_use: ClassVar[str] = "none"
    # False: prepare() returns the finished student (no LoRA training); ``training`` then describes what
    # the method trained itself (steps, seconds, final_loss, resumed_from, log_history)
    post_training: ClassVar[bool] = True
    # roles in a composed transfer (methods/compose.py): a start builds the LoRA student and trains it with
    # plain cross entropy; an objective trains a plain LoRA start toward its own loss (see ObjectiveMethod)
    is_start: ClassVar[bool] = False
    is_objective: ClassVar[bool] = False
    training: dict[str, Any]

    @property
    def teacher_during_training(self) -> bool:
        """Whether the teacher must stay loaded while the student trains (its loss calls the teacher)."""
        return False

    def __init__(self, spec: C) -> None:
        self.spec: C = spec
        # set by prepare() when the LoRA's starting point was subtracted from the base weights
        self.initial_lora: dict[str, Any] | None = None

    @abstractmethod
    def prepare(self, ctx: MethodContext) -> Any:
        """Return the student wrapped as a ``peft.PeftModel``, initialised the method's way."""

    def training_loss(self, ctx: MethodContext) -> LossFn | None:
        """The method's own loss (``pktransfer.training.LossFn``); None: cross entropy on response tokens."""
        return None

    def training_batch(self, ctx: MethodContext) -> BatchFn | None:
        """Rewrites each training batch before the student's forward pass (``pktransfer.training.BatchFn``), e.g.
        on-policy samples in place of the gold responses; None: the batch as the data gives it."""
        return None

    def callbacks(self, ctx: MethodContext) -> list[Any]:
        """``transformers.TrainerCallback``s the method needs during training (e.g. a layer schedule)."""
        return []

    def spent(self) -> dict[str, Any]:
        """Student-side compute beyond the optimizer's batches (e.g. tokens the student generated), recorded
        under ``budget`` in run.json and shown in the comparison's budget table."""
        return {}

    def finish_training(self) -> None:
        """Called once training ended: drop hooks and training-only state before evaluation and saving."""
        return None

    def report(self) -> dict[str, Any]:
        """What the method decided (layers, pairs, timings), recorded under ``method`` in run.json."""
        return {}

    # ---- hooks for comparisons, extra verbs and reports (class-level: no instance needed) ----

    @classmethod
    def shared_work(cls, recipe: Recipe, shared_root: Path) -> SharedWork:
        """In a comparison grid: point this cell's recipe at caches shared across cells, and name work to do once."""
        return SharedWork(recipe)

    @classmethod
    def verbs(cls) -> dict[str, Verb]:
        """Extra CLI verbs this method offers (``pkt extract`` and ``pkt inject`` for Seeking)."""
        return {}

    @classmethod
    def report_notes(cls, labels: list[str]) -> list[str]:
        """Lines the comparison report adds for this method's entries (``labels``)."""
        return []

    def single_process_only(self) -> tuple[str, str] | None:
        """Why this configuration cannot train data-parallel on several processes, and the fix (None: it can)."""
        return None

    def saves_merged(self) -> bool:
        """Whether the run must also write the merged student (the adapter alone does not reproduce it)."""
        return False

    def save_adapter(self, model: Any, folder: Path) -> None:
        """Write a standard PEFT adapter folder loadable on the *unmodified* student."""
        if self.initial_lora is not None:
            save_rebased_adapter(model, folder, self.initial_lora)
        else:
            model.save_pretrained(str(folder))


def plain_lora(ctx: MethodContext) -> tuple[Any, dict[str, Any] | None]:
    """The student wrapped in the recipe's LoRA, initialised as ``lora.init`` says, and its starting factors when that
    start was moved out of the base (``lora.init: pissa``; what ``save_adapter`` rebases against), else None."""
    from peft import get_peft_model

    check_targets(ctx.student.model, ctx.recipe.lora, ctx.student.arch, ctx.progress.warn)
    model = get_peft_model(ctx.student.model, lora_config(ctx.recipe.lora, ctx.student.arch))
    return model, snapshot_lora(model) if ctx.recipe.lora.init == "pissa" else None


class ObjectiveMethod(Method[C]):
    """A method that is an objective: a plain LoRA start trained toward its own loss. ``setup_objective``
    prepares what the loss needs (teacher caches, projections) for any start's student, so a composed
    transfer can pair it with another method's start."""

    is_objective = True

    @abstractmethod
    def setup_objective(self, ctx: MethodContext, model: Any) -> None:
        """Prepare the objective for ``model`` (the PEFT student some start built)."""

    def prepare(self, ctx: MethodContext) -> Any:
        model, self.initial_lora = plain_lora(ctx)
        self.setup_objective(ctx, model)
        return model
