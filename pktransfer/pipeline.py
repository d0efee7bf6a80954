"""Recipe -> models + task -> method (prepares the student) -> training -> evaluation -> report.

``run`` executes a whole recipe; ``evaluate`` scores one model (optionally with an adapter) on a task.
Everything is checked before any model is loaded, so a broken recipe fails in seconds.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pktransfer.data import Item, PromptFormatter, Task, encode_items, get_task, recipe_formatter, train_and_validation
from pktransfer.errors import DataError, ModelError, PktError, RecipeError
from pktransfer.evaluation import EvalOptions, EvalResult, evaluate_items
from pktransfer.evaluation.recipe_eval import _eval_items, eval_options, generation_budget
from pktransfer.fileio import write_json, write_text
from pktransfer.leakguard import LeakGuard, guard_for
from pktransfer.methods import MethodContext, get_method, registry
from pktransfer.methods.base import TeacherWork
from pktransfer.models import LoadedModel, load_config, load_model
from pktransfer.models.tying import untie_if_targeted
from pktransfer.progress import Progress
from pktransfer.recipe import ModelSpec, Recipe, save_recipe
from pktransfer.reports import render_markdown
from pktransfer.runs import MemoryMonitor, RunDir, StageLog, versions
from pktransfer.signals import stop_cleanly
from pktransfer.training import merge_lora, rank_and_world, train


@dataclass
class RunResult:
    output_dir: Path
    run: dict[str, Any]

    @property
    def metrics(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self.run["metrics"]


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def uses_vllm(recipe: Recipe, device_type: str) -> bool:
    from pktransfer.evaluation import vllm_backend

    return vllm_backend.resolve(recipe.evaluation.backend, device_type) == "vllm"


def check_code_opt_in(task: Task, allowed: bool) -> None:
    """Code tasks run generated programs: refuse them before any model loads unless allowed."""
    if task.kind == "code":
        from pktransfer.evaluation.sandbox import require_opt_in

        require_opt_in(allowed, f"task '{task.name}'")


def metric_table(metrics: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """label -> split -> the headline figures of each evaluation summary (what run.json keeps)."""
    return {
        label: {
            split: {k: m[k] for k in ("n", "correct", "accuracy", "seconds", "predicted", "reference_counts") if k in m}
            for split, m in by_split.items()
        }
        for label, by_split in metrics.items()
    }


def formatter_for(loaded: LoadedModel, task: Task, recipe: Recipe) -> PromptFormatter:
    return recipe_formatter(loaded.tokenizer, task, recipe.task, recipe.method.name)


def _evaluate_cached(
    rd: RunDir,
    model: Any,
    formatter: PromptFormatter,
    task: Task,
    recipe: Recipe,
    label: str,
    progress: Progress,
    source: str | None = None,
    dtype: torch.dtype | None = None,
    restore: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on every split the recipe names (reusing finished ones); ``source``: where its weights are on
    disk, for the vLLM backend; ``dtype``: the dtype to score it in (None: ``evaluation.dtype``, else as it is), its
    parameters given back afterwards with ``restore``."""
    from pktransfer.models.precision import DTYPES, scored_in

    if recipe.evaluation.dtype == "as-is":
        dtype = None
    elif recipe.evaluation.dtype != "auto":
        dtype = DTYPES[recipe.evaluation.dtype]
    with scored_in(model, dtype, restore):
        return _evaluate_splits(rd, model, formatter, task, recipe, label, progress, source)


def _evaluate_splits(
    rd: RunDir,
    model: Any,
    formatter: PromptFormatter,
    task: Task,
    recipe: Recipe,
    label: str,
    progress: Progress,
    source: str | None,
) -> dict[str, dict[str, Any]]:
    from pktransfer.models.precision import params_dtype
    from pktransfer.ops.offload import input_device

    dtype_name = str(params_dtype(model)).removeprefix("torch.")
    options = eval_options(recipe, task, source, input_device(model).type, dtype_name)
    out = {}
    for split in recipe.evaluation.splits:
        items = _eval_items(task, split, recipe)
        done = EvalResult.finished(rd.work / "eval", label, task.name, split)
        if done is not None:  # resumed run: this evaluation already finished
            out[split] = done
            progress.log(f"{label} on {split}: reusing finished evaluation ({100 * done['accuracy']:.1f}%)")
            continue
        res = evaluate_items(model, formatter, items, label=label, task=task, split=split, options=options, progress=progress)
        res.summary["dtype"] = dtype_name  # what the weights were scored in (evaluation.dtype)
        res.save(rd.work / "eval")
        progress.log(
            f"{label} on {task.name}/{split}: {100 * res.accuracy:.1f}% ({res.summary['correct']}/{len(items)})"
            + "".join(f", {k} {100 * v:.1f}%" for k, v in res.summary.get("metrics", {}).items())
        )
        out[split] = res.summary
    return out


@contextmanager
def run_folder(
    recipe: Recipe,
    overwrite: bool,
    progress: Progress,
    extra_fields: dict[str, Any] | None = None,
    kind: str = "run",
    only: tuple[str, ...] | None = None,
) -> Iterator[tuple[RunDir, StageLog]]:
    """An output folder that is finished atomically (or marked FAILED), with stage timing and memory. While it is
    held, SIGTERM / SIGINT stop cleanly: FAILED.json with the reason, the claim released, and during training a
    checkpoint at the end of the current step (``pktransfer.signals``). ``extra_fields``: more of what the folder's
    results depend on (it is resumed only when they match too); ``only``: the recipe's sections they depend on (None:
    every section that is a result field)."""
    dump = recipe.dump()
    fields = {k: v for k, v in dump.items() if only is None or k in only}
    with stop_cleanly():
        rd = RunDir(recipe.output_dir, overwrite=overwrite, recipe={**fields, **(extra_fields or {})}, kind=kind)
        if rd.claim.took_over is not None:
            progress.log(f"taking over {rd.final} from a process that is gone ({rd.claim.took_over.describe()})")
        if rd.resumed:
            progress.log(f"resuming the unfinished run in {rd.work}")
        try:
            save_recipe(recipe, rd.path("recipe.yaml"))
            with MemoryMonitor() as monitor:
                yield rd, StageLog(monitor)
        except BaseException as err:
            rd.fail(err)
            raise


def model_identity(loaded: LoadedModel) -> dict[str, Any]:
    """What run.json keeps of a loaded model: its name, where its weights were read, their dtype and SHA-256 (a local
    folder's weight files; the offline pair's dequantised weights are such a folder)."""
    return {"model": loaded.name, "source": loaded.source, "dtype": str(loaded.dtype).removeprefix("torch."),
            "weights_sha256": loaded.weights_sha256}  # fmt: skip


def run_info(recipe: Recipe, log: StageLog, started: float, **extra: Any) -> dict[str, Any]:
    return {
        "status": "finished",
        "recipe": recipe.dump(),
        "seed": recipe.seed,
        **extra,
        "stages": log.stages,
        "versions": versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
    }


def check_recipe(recipe: Recipe) -> tuple[Task, list[Item]]:
    """Everything that can be checked without loading weights: task, data files, splits, models' configs."""
    task = get_task(recipe.task.name, recipe.task.params, recipe.task.data_dir)
    train_items, _ = train_and_validation(task, recipe.task.n_train, recipe.task.validation)
    empty = [it.id for it in train_items if not it.response.strip()]
    if empty:
        raise DataError(
            f"task '{task.name}': {len(empty)} of {len(train_items)} training items have a prompt and no "
            f"response (e.g. '{empty[0]}'); training would learn nothing from them",
            hint="give every training row a non-empty 'response' (or an assistant turn in 'messages')",
        )
    for split in recipe.evaluation.splits:
        _eval_items(task, split, recipe)
    if recipe.evaluation.learning_curve:
        _eval_items(task, "validation", recipe)  # the curve scores validation items: fail before any model loads
    check_code_opt_in(task, recipe.evaluation.allow_code_execution)
    from pktransfer.evaluation import vllm_backend

    if recipe.evaluation.backend == "vllm":
        vllm_backend.require()  # not an hour later, at the first evaluation
    objective = getattr(recipe.method, "objective", None)  # a composed transfer's objective
    if getattr(objective or recipe.method, "sampler", None) == "vllm":
        vllm_backend.require("objective.sampler" if objective is not None else "method.sampler")
    load_config(recipe.student.model, recipe.student.revision)
    if recipe.evaluation.teacher or get_method(recipe.method).needs_teacher:
        load_config(recipe.teacher.model, recipe.teacher.revision)
    return task, train_items


class TeacherHandle:
    """The teacher for one run: loaded on first use, released once, whatever happens (a context manager)."""

    def __init__(self, spec: ModelSpec, log: StageLog, progress: Progress, guard: LeakGuard | None = None) -> None:
        self.spec, self.log, self.progress, self.guard = spec, log, progress, guard
        self._loaded: LoadedModel | None = None
        self.identity: dict[str, Any] | None = None  # what was loaded, once it was

    def __call__(self) -> LoadedModel:
        if self._loaded is None:
            with self.log.stage("load_teacher"):
                self._loaded = load_model(self.spec, log=self.progress.log)
            if self.guard is not None:
                self.guard.watch(self._loaded.model, self._loaded.tokenizer, "teacher")
            self.identity = model_identity(self._loaded)
        return self._loaded

    def release(self) -> None:
        if self._loaded is not None:
            self._loaded.unload()
            self._loaded = None

    def __enter__(self) -> TeacherHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Trained:
    model: Any  # the student to evaluate and save (a PeftModel, or the method's finished model)
    training: dict[str, Any]
    spent: dict[str, Any]


def run(
    recipe: Recipe,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    evaluate: bool = True,
    progress: Progress | None = None,
    cache_dir: str | Path | None = None,
) -> RunResult:
    """Run a recipe end to end and return where its outputs are and what it measured.

    ``cache_dir``: a folder of content-keyed caches several runs share (a grid's shared/, e.g. LaTen's neuron
    location per item); the results are the same with or without it.

    Under ``torchrun`` / ``accelerate launch`` (several processes) the student trains data-parallel: every
    process prepares the same start (the method's teacher-side step included), the global batch
    ``training.batch_size`` is split between them, and process 0 alone writes the run folder and evaluates.
    """
    rank, world = rank_and_world()
    if world > 1:
        check_distributable(recipe)
        if rank > 0:
            return _run_as_worker(recipe)
    return _run(
        recipe,
        overwrite=overwrite,
        evaluate=evaluate,
        progress=progress or Progress(quiet=quiet),
        world=world,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
    )


def _run(
    recipe: Recipe, *, overwrite: bool, evaluate: bool, progress: Progress, world: int = 1, cache_dir: Path | None = None
) -> RunResult:
    """The body of ``run`` (also each worker process's, with ``evaluate`` off)."""
    task, train_items = check_recipe(recipe)
    method = get_method(recipe.method)
    if world == 1:
        from pktransfer.plan import check_recipe_fits

        check_recipe_fits(recipe)  # on a GPU: refused now, not at an out-of-memory error an hour in
    guard = guard_for(task)
    started = time.time()
    with (
        run_folder(recipe, overwrite, progress) as (rd, log),
        TeacherHandle(recipe.teacher, log, progress, guard) as teacher,
    ):
        metrics: dict[str, dict[str, Any]] = {}
        if evaluate and recipe.evaluation.teacher:
            metrics["teacher"] = _evaluate_teacher(rd, log, teacher, task, recipe, progress)
            if not method.needs_teacher:
                teacher.release()
        student, formatter = _load_student(recipe, task, log, progress, guard)
        student_dtype = student.dtype  # the trained student is scored in it (evaluation.dtype: auto)
        if evaluate and recipe.evaluation.student:
            with log.stage("eval_student"):
                metrics["student"] = _evaluate_cached(
                    rd, student.model, formatter, task, recipe, "student", progress, student.source
                )
        examples = encode_items(formatter, train_items, recipe.training.max_length, f"task '{task.name}' train split")
        ctx = MethodContext(recipe, student, task, formatter, rd.work, progress, teacher, examples, cache_dir=cache_dir)
        with guard.active("preparation and training"):
            trained = _prepare_and_train(method, ctx, rd, log, teacher, guard)
        teacher.release()
        merged, outputs = _save(method, trained, student, recipe, rd)
        from pktransfer.ops.offload import input_device

        vllm = evaluate and uses_vllm(recipe, input_device(merged).type)
        if outputs["merged"] or vllm:  # vLLM reads the trained weights from the merged copy (kept as merged/)
            merged.save_pretrained(str(rd.path("merged")), safe_serialization=True)
            student.tokenizer.save_pretrained(str(rd.path("merged")))
            outputs["merged"] = "merged"
        if evaluate:
            with log.stage("eval_trained"):
                source = str(rd.path("merged")) if vllm else None
                metrics["trained"] = _evaluate_cached(
                    rd, merged, formatter, task, recipe, "trained", progress, source, dtype=student_dtype, restore=False
                )
        info = run_info(
            recipe,
            log,
            started,
            task=task.describe(),
            prompt_format=formatter.describe(),
            data={"n_train": len(examples), "n_train_items": len(train_items)},
            training={**trained.training, "processes": world},
            budget={
                **trained.spent,
                "training_tokens_counted": "non-padding input tokens of every batch the optimizer saw",
                "teacher": ctx.teacher_work.to_dict(),
            },
            metrics=metric_table(metrics),
            method=method.report(),
            outputs=outputs,
            models={"student": model_identity(student), **({"teacher": teacher.identity} if teacher.identity else {})},
            **guard.report(),
        )
        rd.write_json("run.json", info)
        write_text(rd.path("report.md"), render_markdown(info))
    return RunResult(rd.finish(), info)


def check_distributable(recipe: Recipe) -> None:
    """Methods that train the student with the shared LoRA trainer can run on several processes, data-parallel.

    FSDP (``accelerate launch`` with an FSDP config) is refused: accelerate and transformers run FSDP only on
    GPUs, so it could not be tested here, and process 0 would save and evaluate a sharded model as if whole."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise RecipeError(
            "FSDP student training is not supported yet (accelerate launch was given an FSDP config)",
            hint="launch data-parallel instead (examples/accelerate-ddp.yaml or torchrun); shard the teacher with "
            "teacher.device_map when it is the model that does not fit",
        )
    method = get_method(recipe.method)
    if not method.post_training:
        raise RecipeError(
            f"method '{recipe.method.name}' does not train the student with the LoRA trainer, so it cannot run on "
            "several processes",
            hint="run it as one process (python -m pktransfer.cli run ..., without torchrun / accelerate launch)",
        )
    if (why := method.single_process_only()) is not None:
        raise RecipeError(f"method '{recipe.method.name}' cannot run on several processes: {why[0]}", hint=why[1])


def _run_as_worker(recipe: Recipe) -> RunResult:
    """A process other than 0: the same preparation and training steps (DDP keeps them in step), in a private
    temporary folder that is deleted afterwards; no evaluation, nothing written where the run's outputs go."""
    with tempfile.TemporaryDirectory(prefix="pktransfer-worker-") as tmp:
        worker = recipe.model_copy(update={"output_dir": str(Path(tmp) / "run")})
        res = _run(worker, overwrite=False, evaluate=False, progress=Progress(quiet=True), world=rank_and_world()[1])
        return RunResult(Path(recipe.output_dir), {"worker": True, "training": res.run["training"]})


def _evaluate_teacher(
    rd: RunDir, log: StageLog, teacher: TeacherHandle, task: Task, recipe: Recipe, progress: Progress
) -> dict[str, Any]:
    loaded = teacher()
    with log.stage("eval_teacher"):
        return _evaluate_cached(
            rd, loaded.model, formatter_for(loaded, task, recipe), task, recipe, "teacher", progress, loaded.source
        )


def _load_student(
    recipe: Recipe, task: Task, log: StageLog, progress: Progress, guard: LeakGuard
) -> tuple[LoadedModel, PromptFormatter]:
    with log.stage("load_student"):
        student = load_model(recipe.student, log=progress.log)
        untie_if_targeted(student, recipe.lora.target_modules, progress.log)  # merging must not move lm_head
    guard.watch(student.model, student.tokenizer, "student")
    return student, formatter_for(student, task, recipe)


def _prepare_and_train(
    method: Any, ctx: MethodContext, rd: RunDir, log: StageLog, teacher: TeacherHandle, guard: LeakGuard
) -> Trained:
    """The method's preparation, then the shared LoRA training (unless the method trained what it trains)."""
    recipe = ctx.recipe
    seed_everything(recipe.seed)
    with log.stage("prepare"):
        model = method.prepare(ctx)
    if not method.teacher_during_training:
        teacher.release()
    if not method.post_training:  # e.g. LaTen's hypernetworks, trained inside prepare
        write_json(rd.path("checkpoints") / "log_history.json", method.training.get("log_history", []))
        t = method.training
        return Trained(
            model,
            {k: v for k, v in t.items() if k != "log_history"},
            {
                "trainable_parameters": t.get("trainable_parameters"),
                "optimizer_steps": t.get("steps"),
                "training_tokens": t.get("tokens_seen"),
            },
        )
    if recipe.training.max_steps == 0:  # the start as it is (e.g. a training-free transfer): nothing to train
        return Trained(
            model,
            {"steps": 0, "seconds": 0.0, "final_loss": None, "resumed_from": None},
            {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad), "optimizer_steps": 0,
             "training_tokens": 0, **method.spent()},
        )  # fmt: skip
    curve = learning_curve_callback(ctx, method, guard)
    ledger = cost_ledger_callback(ctx, method, curve)
    with log.stage("train"):
        try:
            result = train(
                model,
                ctx.student.tokenizer,
                ctx.examples,
                recipe.training,
                output_dir=rd.path("checkpoints"),
                seed=recipe.seed,
                progress=ctx.progress,
                loss=method.training_loss(ctx),
                batch=method.training_batch(ctx),
                callbacks=[*method.callbacks(ctx), *([curve] if curve else []), ledger],
            )
        finally:
            method.finish_training()
    totals = ledger.totals(result.steps)  # this attempt plus the earlier ones up to the checkpoint it resumed from
    if ledger.earlier is not None:
        for k, v in totals["teacher"].items():  # in place: the method's hooks hold ctx, not a copy
            setattr(ctx.teacher_work, k, v)
    return Trained(
        model,
        {
            "steps": result.steps,
            "seconds": round(result.seconds + (ledger.earlier["train_seconds"] if ledger.earlier else 0.0), 2),
            "final_loss": result.final_loss,
            "resumed_from": result.resumed_from,
            **ledger.resumed_fields(result.seconds),
            **({"learning_curve": curve.points} if curve else {}),
        },
        {
            "trainable_parameters": result.trainable_parameters,
            "optimizer_steps": result.steps,
            "training_tokens": result.tokens_seen,
            **totals["spent"],
        },
    )


LEDGER = "pktransfer_cost.json"


def cost_ledger_callback(ctx: MethodContext, method: Any, curve: Any = None) -> Any:
    """A ``TrainerCallback`` that keeps the run's cost with each checkpoint, so a resumed run reports the cost of
    the whole run, not of its last attempt: the training seconds, the teacher work (``ctx.teacher_work``), the
    method's own counters (``method.spent()``: tokens the student generated, ...) and the learning curve's points,
    all up to the checkpoint's step (work done after it and redone is counted once).
    ``totals(step)`` gives the sums; ``earlier`` is the ledger of the checkpoint this attempt resumed from (None for
    a fresh start, or a checkpoint written before the ledger existed: then ``unledgered_from`` names its step)."""
    from transformers import TrainerCallback

    def add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            number = isinstance(v, int | float) and not isinstance(v, bool)
            out[k] = out[k] + v if number and isinstance(out.get(k), int | float) else out.get(k, v)
        return out

    class CostLedger(TrainerCallback):
        def __init__(self) -> None:
            self.earlier: dict[str, Any] | None = None
            self.unledgered_from: int | None = None
            self._t0 = time.perf_counter()
            self._base = asdict(ctx.teacher_work)  # this attempt's preparation (a resumed one redoes or reuses it)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0 = time.perf_counter()
            self._base = asdict(ctx.teacher_work)
            if state.global_step:  # resumed: the trainer state is loaded before this call
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / LEDGER
                if path.is_file():
                    self.earlier = json.loads(path.read_text())
                    if curve is not None:
                        curve.points[:0] = self.earlier.get("learning_curve", [])
                else:
                    self.unledgered_from = state.global_step

        def totals(self, step: int) -> dict[str, Any]:
            now = asdict(ctx.teacher_work)
            elapsed = time.perf_counter() - self._t0
            if self.earlier is None:
                return {"step": step, "attempts": 1, "train_seconds": elapsed, "teacher": now, "spent": method.spent(),
                        "learning_curve": list(curve.points) if curve else []}  # fmt: skip
            e = self.earlier
            this_training = {k: now[k] - self._base[k] for k in ("forward_tokens", "backward_tokens", "seconds")}
            teacher = add(e["teacher"], this_training)
            teacher["what"] = [*e["teacher"]["what"], *(w for w in now["what"] if w not in e["teacher"]["what"])]
            teacher["parameters"] = max(e["teacher"]["parameters"], now["parameters"])
            merged = TeacherWork()  # the caches either attempt read or built
            for c in [*e["teacher"].get("caches", []), *now["caches"]]:
                merged.cache_used(c["file"], built=c["built"], cost=c.get("cost"))
            teacher["caches"] = merged.caches
            return {
                "step": step,
                "attempts": e["attempts"] + 1,
                "train_seconds": e["train_seconds"] + elapsed,
                "teacher": teacher,
                "spent": add(e["spent"], method.spent()),
                "learning_curve": list(curve.points) if curve else [],
            }

        def resumed_fields(self, seconds_this_attempt: float) -> dict[str, Any]:
            """For run.json's ``training``: what the earlier attempts cost (``cost_kept``: False when the checkpoint
            predates the ledger, so the run's counts cover its last attempt only)."""
            if self.earlier is not None:
                kept = {k: self.earlier[k] for k in ("attempts", "step", "train_seconds")}
                return {"seconds_this_attempt": round(seconds_this_attempt, 2), "earlier_attempts": {**kept, "cost_kept": True}}
            if self.unledgered_from is not None:
                return {"earlier_attempts": {"step": self.unledgered_from, "cost_kept": False}}
            return {}

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and state.is_world_process_zero:  # several processes never resume (training.train)
                write_json(folder / LEDGER, self.totals(state.global_step))

    return CostLedger()


def learning_curve_callback(ctx: MethodContext, method: Any, guard: LeakGuard) -> Any:
    """``evaluation.learning_curve: N``: a ``TrainerCallback`` that scores the validation items with the adapter as it
    stands at every 1/N of the training steps (eval mode, greedy: it draws no random numbers, so training is unchanged),
    kept in ``points`` as {step, fraction, validation}. None when the recipe asks for no curve."""
    n = ctx.recipe.evaluation.learning_curve
    if not n or not method.post_training:
        return None
    from transformers import TrainerCallback

    items = _eval_items(ctx.task, "validation", ctx.recipe)  # a clear error when task.validation is not set
    options = eval_options(ctx.recipe, ctx.task)

    class LearningCurve(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            total = state.max_steps
            targets = {max(1, round(total * k / n)) for k in range(1, n + 1)}
            if state.global_step not in targets or model is None:
                return
            model.eval()
            try:
                with guard.active(None):  # evaluation may ask what the student side never reads
                    res = evaluate_items(
                        model, ctx.formatter, items, label="curve", task=ctx.task, split="validation", options=options
                    )
            finally:
                model.train()
            self.points.append({"step": state.global_step, "fraction": state.global_step / total, "validation": res.accuracy})
            ctx.progress.log(f"learning curve: step {state.global_step}/{total}: validation {100 * res.accuracy:.1f}%")

    return LearningCurve()


def _save(method: Any, trained: Trained, student: LoadedModel, recipe: Recipe, rd: RunDir) -> tuple[Any, dict[str, Any]]:
    """Write the adapter (methods that post-train a LoRA) and return the merged student to evaluate."""
    if method.post_training:
        method.save_adapter(trained.model, rd.path("adapter"))
        student.tokenizer.save_pretrained(str(rd.path("adapter")))
        merged = merge_lora(trained.model)
    else:
        merged = trained.model
    save_merged = recipe.training.save_merged or not method.post_training or method.saves_merged()
    return merged, {
        "adapter": "adapter" if method.post_training else None,
        "merged": "merged" if save_merged else None,
        "eval": "eval",
        "checkpoints": "checkpoints",
    }


def evaluate_pair(recipe: Recipe, *, quiet: bool = False, overwrite: bool = False, progress: Progress | None = None) -> RunResult:
    """Evaluate the untouched teacher and/or student as the recipe's evaluation section says (no training).

    ``pkt compare`` runs this once for a whole grid: greedy decoding does not depend on the seed.
    """
    progress = progress or Progress(quiet=quiet)
    task, _ = check_recipe(recipe)
    started = time.time()
    with run_folder(recipe, overwrite, progress) as (rd, log):
        metrics: dict[str, dict[str, Any]] = {}
        identities: dict[str, dict[str, Any]] = {}
        fmt_info = None
        for label, spec, wanted in (
            ("teacher", recipe.teacher, recipe.evaluation.teacher),
            ("student", recipe.student, recipe.evaluation.student),
        ):
            if not wanted:
                continue
            with log.stage(f"load_{label}"):
                loaded = load_model(spec, log=progress.log)
            formatter = formatter_for(loaded, task, recipe)
            fmt_info = formatter.describe()
            identities[label] = model_identity(loaded)
            with log.stage(f"eval_{label}"):
                metrics[label] = _evaluate_cached(
                    rd, loaded.model, formatter, task, recipe, label, progress, loaded.source, restore=False
                )
            loaded.unload()
        info = run_info(
            recipe,
            log,
            started,
            task=task.describe(),
            prompt_format=fmt_info,
            metrics=metric_table(metrics),
            outputs={"eval": "eval"},
            models=identities,
        )
        rd.write_json("run.json", info)
    return RunResult(rd.finish(), info)


def method_verb(recipe: Recipe, verb: str) -> Any:
    """The ``Verb`` the recipe's method offers under ``verb`` (a clear error if it offers none)."""
    cls = registry.method_class(recipe.method.name)
    offered = cls.verbs()
    if verb not in offered:
        having = sorted(n for n in registry.names() if verb in registry.method_class(n).verbs())
        raise RecipeError(
            f"`pkt {verb}` works on method(s) {having}, the recipe's method is '{recipe.method.name}'",
            hint=f"set method.name to one of {having} (with its options) in the recipe",
        )
    return offered[verb]


def run_verb(
    recipe: Recipe, verb: str, *, quiet: bool = False, overwrite: bool = False, progress: Progress | None = None
) -> RunResult:
    """Run a method's extra verb (e.g. Seeking's ``extract`` / ``inject``) in its own run folder."""
    progress = progress or Progress(quiet=quiet)
    v = method_verb(recipe, verb)  # fail fast, before any output folder exists
    task, _ = check_recipe(recipe)
    v.check(recipe, task)  # check_recipe above already checked the teacher of a method that needs one
    guard = guard_for(task)
    started = time.time()
    with (
        run_folder(recipe, overwrite, progress) as (rd, log),
        TeacherHandle(recipe.teacher, log, progress, guard) as teacher,
    ):
        student, formatter = _load_student(recipe, task, log, progress, guard)
        ctx = MethodContext(recipe, student, task, formatter, rd.work, progress, teacher)
        with guard.active(verb):
            done = v.run(get_method(recipe.method), ctx, log)
        info = run_info(recipe, log, started, verb=verb, **done, **guard.report())
        info["budget"] = {"teacher": ctx.teacher_work.to_dict()}  # what the grid's cells share, counted once
        rd.write_json("run.json", info)
    return RunResult(rd.finish(), info)


def extract(recipe: Recipe, *, quiet: bool = False, overwrite: bool = False, progress: Progress | None = None) -> RunResult:
    """``pkt extract``: the recipe's method's ``extract`` verb (Seeking: sensitivity and layer selection)."""
    return run_verb(recipe, "extract", quiet=quiet, overwrite=overwrite, progress=progress)


def inject(recipe: Recipe, *, quiet: bool = False, overwrite: bool = False, progress: Progress | None = None) -> RunResult:
    """``pkt inject``: the recipe's method's ``inject`` verb (Seeking: the teacher-initialised LoRA, untrained)."""
    return run_verb(recipe, "inject", quiet=quiet, overwrite=overwrite, progress=progress)


def transport(recipe: Recipe, *, quiet: bool = False, overwrite: bool = False, progress: Progress | None = None) -> RunResult:
    """``pkt transport``: the recipe's method's ``transport`` verb (delta: the teacher's update moved into the student)."""
    return run_verb(recipe, "transport", quiet=quiet, overwrite=overwrite, progress=progress)


def evaluate(
    model: str | ModelSpec,
    task: str = "arithmetic",
    *,
    split: str = "test",
    adapter: str | None = None,
    limit: int | None = None,
    subset_seed: int | None = None,
    batch_size: int | str = 16,
    max_new_tokens: int | None = None,
    data_dir: str | None = None,
    task_params: dict[str, Any] | None = None,
    prompt_format: str = "auto",
    n_samples: int = 1,
    temperature: float = 0.8,
    seed: int = 0,
    allow_code_execution: bool = False,
    output_dir: str | None = None,
    quiet: bool = False,
    progress: Progress | None = None,
    backend: str = "auto",
) -> EvalResult:
    """Evaluate a model (hub id, folder, builtin:NAME; a merged model is a folder; optionally with a PEFT
    adapter on top) on a task split. ``limit`` takes the first N items, or N drawn with ``subset_seed``.
    ``backend``: hf, vllm or auto (vLLM on CUDA where installed); with vLLM and an adapter, the merged model is saved
    to a temporary folder for the engine."""
    progress = progress or Progress(quiet=quiet)
    for name, value in (("limit", limit), ("n_samples", n_samples)) + (
        (("batch_size", batch_size),) if batch_size != "auto" else ()
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise RecipeError(
                f"{name}={value!r} is not valid",
                hint=f"{name} must be a positive integer (leave --limit out to evaluate every item)",
            )
    if output_dir:
        from pktransfer.runs import check_output_location

        check_output_location(Path(output_dir).expanduser().resolve())
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model=model)
    t = get_task(task, task_params, data_dir)
    items = t.split(split)
    check_code_opt_in(t, allow_code_execution)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise PktError(
            f"adapter folder '{adapter}' has no adapter_config.json",
            hint="pass a folder written by PeftModel.save_pretrained (a run's adapter/ folder)",
        )
    from pktransfer.evaluation import vllm_backend

    if backend not in ("auto", "hf", "vllm"):
        raise RecipeError(f"backend {backend!r} is not known", hint="use auto, hf or vllm")
    if backend == "vllm":
        vllm_backend.require()  # before any model loads
    loaded = load_model(spec, log=progress.log)
    net = loaded.model
    if adapter is not None:
        from peft import PeftModel

        try:
            net = merge_lora(PeftModel.from_pretrained(net, adapter))
        except (RuntimeError, ValueError, KeyError) as err:
            raise ModelError(
                f"adapter '{adapter}' does not fit model '{spec.model}': {str(err).splitlines()[0][:200]}",
                hint="use the student the adapter was trained on",
            ) from None
    formatter = PromptFormatter(loaded.tokenizer, prompt_format, t.system_prompt, t.plain_separator)  # type: ignore[arg-type]
    opts = EvalOptions(
        batch_size=batch_size,
        max_new_tokens=generation_budget(max_new_tokens, t),
        limit=limit,
        subset_seed=subset_seed,
        n_samples=n_samples,
        temperature=temperature,
        seed=seed,
        allow_code_execution=allow_code_execution,
        backend=vllm_backend.resolve(backend, loaded.device.type),
    )
    with tempfile.TemporaryDirectory(prefix="pktransfer-vllm-") as tmp:
        if opts.backend == "vllm":
            opts.vllm_source, opts.vllm_dtype = loaded.source, str(loaded.dtype).removeprefix("torch.")
            if adapter is not None:  # the engine reads the merged weights (the ones hf would evaluate)
                net.save_pretrained(tmp, safe_serialization=True)
                loaded.tokenizer.save_pretrained(tmp)
                opts.vllm_source = tmp
        res = evaluate_items(net, formatter, items, label="model", task=t, split=split, options=opts, progress=progress)
    res.summary.update({"model": spec.model, "adapter": adapter})
    if output_dir:
        res.save(Path(output_dir))
    return res


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
