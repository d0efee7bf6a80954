"""The YAML recipe: one pydantic schema, the single source of truth for a run.

A recipe names teacher, student, task, method (with its parameters), LoRA and training arguments,
evaluation, seed and output folder. Unknown keys are rejected; a validation error names the field, the
bad value and what is allowed. CLI overrides (``--set training.lr=1e-4``) are applied to the raw
mapping before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pktransfer.errors import RecipeError
from pktransfer.models.builtin import DEFAULT_STUDENT, DEFAULT_TEACHER

M = TypeVar("M", bound=BaseModel)
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    """A causal LM: ``builtin:NAME``, a local folder, or a hub id."""

    model: str = Field(min_length=1)
    dtype: DTypeName = "auto"
    device: DeviceName = "auto"
    revision: str | None = None


class TaskSpec(Strict):
    """A task from the registry (``pkt tasks``) and its split sizes."""

    name: str = "arithmetic"
    data_dir: str | None = Field(
        default=None, description="folder with the benchmark data (default: $PKT_DATA_DIR or ../shared/data)"
    )
    n_train: int | None = Field(default=None, ge=1, description="cap on training items (None: the whole split)")
    n_test: int | None = Field(default=None, ge=1, description="cap on test items (None: the whole split)")
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    params: dict[str, Any] = Field(default_factory=dict, description="task-specific options")


class LoraSpec(Strict):
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    init: Literal["default", "gaussian", "pissa"] = "default"
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="per-module ranks, e.g. {q_proj: 8}")


class TrainingSpec(Strict):
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="overrides epochs when set")
    lr: float = Field(default=3e-4, gt=0, le=1)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=8, description="cutoff in tokens (prompt + response)")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    save_steps: int = Field(default=50, ge=1, description="checkpoint interval for resume")
    logging_steps: int = Field(default=5, ge=1)
    gradient_checkpointing: bool = False
    save_merged: bool = Field(default=False, description="also write a merged full model")


class EvaluationSpec(Strict):
    splits: list[str] = Field(default_factory=lambda: ["test"], min_length=1)
    limit: int | None = Field(default=None, ge=1, description="evaluate only N items (the first N, or a seeded draw)")
    subset_seed: int | None = Field(default=None, description="with limit: draw the N items with this seed")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=16, description="or 'auto': the largest that fits (CUDA)")
    n_samples: int = Field(default=1, ge=1, description="code tasks: completions per problem (pass@k for k <= n)")
    temperature: float = Field(default=0.8, ge=0, description="code tasks: sampling temperature when n_samples > 1")
    allow_code_execution: bool = Field(default=False, description="run generated code (sandboxed) for code tasks")
    max_new_tokens: int | None = Field(default=None, ge=1,
                                       description="generation budget (None: the task's own, e.g. 12 for arithmetic)")
    teacher: bool = Field(default=True, description="also evaluate the teacher")
    student: bool = Field(default=True, description="also evaluate the untouched student")


class LoraMethod(Strict):
    """Plain LoRA on the student (the reference baseline); LoRA init comes from ``lora.init``."""

    name: Literal["lora"] = "lora"


class SeekingMethod(Strict):
    """Seeking (methods.md §1): teacher sensitivity -> layer/dimension selection -> SVD-initialised LoRA."""

    name: Literal["seeking"] = "seeking"
    n_seed: int = Field(default=32, ge=1, description="seed samples for the sensitivity (paper: 32)")
    layers: Literal["sensitivity", "random", "top", "last"] | list[int] = "sensitivity"
    structure: Literal["submatrix", "row_column", "neuron", "random", "uniform"] = "submatrix"
    modules: list[Literal["embed", "attention", "ffn", "all"]] = Field(default_factory=lambda: ["all"], min_length=1)
    map_dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="dtype of the submatrix map")
    sensitivity: str | None = Field(default=None, description="reuse a saved sensitivity folder (pkt extract)")
    gradient_checkpointing: bool = False
    grow: Literal["error", "pad"] = Field(
        default="error", description="a student dimension larger than the teacher's: refuse, or zero-pad")


class PissaMethod(Strict):
    """Baseline: LoRA started at the student's own top-r singular vectors (peft's PiSSA init); ``lora.init`` is ignored."""

    name: Literal["pissa"] = "pissa"
    niter: int | None = Field(default=None, ge=1,
                              description="fast randomised SVD with this many subspace iterations (None: exact SVD)")


class KdMethod(Strict):
    """Baseline: LoRA student trained with (1 − alpha)·CE + alpha·T²·KL(teacher_T ‖ student_T) on response tokens."""

    name: Literal["kd"] = "kd"
    temperature: float = Field(default=2.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the KL term (1: distillation only)")
    cache: bool = Field(default=True, description="precompute the teacher's logits once and free the teacher; "
                                                   "false keeps the teacher in memory and uses its full distribution")
    top_k: int | None = Field(default=64, ge=1, description="cached logits per position (None: the whole vocabulary)")
    logits_cache: str | None = Field(default=None, description="folder for cached teacher logits (shared by runs)")


class WeightSelectionMethod(Strict):
    """Baseline (Xu et al., ICLR 2024): LoRA started from uniformly spaced teacher indices, no sensitivity."""

    name: Literal["weight_selection"] = "weight_selection"
    layers: Literal["first", "uniform", "last"] | list[int] = Field(
        default="first", description="teacher layers for the student's layers (Xu et al.: the first N)")
    modules: list[Literal["embed", "attention", "ffn", "all"]] = Field(default_factory=lambda: ["all"], min_length=1)


class SemAlignMethod(Strict):
    """SemAlign (methods.md §3): teacher activations mapped through semantic bases supervise paired student layers."""

    name: Literal["semalign"] = "semalign"
    n_seed: int = Field(default=32, ge=1, description="seed-split samples for the teacher's layer attribution")
    critical_layers: int | Literal["all"] = Field(
        default=4, description="how many top-attributed teacher layers to transfer ('all': pair every student layer)")
    rank_by: Literal["score", "abs"] = Field(
        default="score", description="rank teacher layers by the signed gradient x activation sum, or its magnitude")
    point: Literal["mlp", "attention", "layer"] = Field(
        default="mlp", description="supervised activation: a sublayer's output before the residual add (mlp or "
                                   "attention), or the whole layer's output")
    target_modules: list[str] | None = Field(
        default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"],
        description="LoRA targets (the paper's four); None: lora.target_modules")
    lora_layers: Literal["paired", "all"] = Field(default="paired", description="LoRA on the paired layers only, or all")
    schedule: Literal["joint", "shallow_to_deep"] = Field(
        default="joint", description="train every pair at once, or one pair after another from shallow to deep")
    activation_weight: float = Field(default=1.0, ge=0, description="weight of 1 − mean cos(h_S, h~_S)")
    logit_weight: float = Field(default=1.0, ge=0, description="weight of 1 − mean cos(z, onehot(y))")
    cache: bool = Field(default=True, description="precompute the teacher's targets once and free the teacher; "
                                                   "false keeps the teacher in memory and maps its activations live")
    cache_dir: str | None = Field(default=None, description="folder for semantic bases and cached targets "
                                                             "(shared by runs; default: the run's folder)")
    basis_chunk: int = Field(default=8192, ge=1, description="vocabulary rows per step of the basis computation")

    @model_validator(mode="after")
    def _check(self) -> SemAlignMethod:
        if isinstance(self.critical_layers, int) and self.critical_layers < 1:
            raise ValueError("critical_layers must be at least 1 (or 'all')")
        if self.activation_weight == 0 and self.logit_weight == 0:
            raise ValueError("activation_weight and logit_weight are both 0: nothing to train")
        return self


class LatenMethod(Strict):
    """LaTen (methods.md §2): locate neurons, map them with hypernetworks, inject; no post-training.

    The ``training`` section does not apply: LaTen trains only its hypernetworks, for ``steps`` steps.
    """

    name: Literal["laten"] = "laten"
    n_extract: int = Field(default=20, ge=1, description="extract-split samples used to locate (paper: 20)")
    transfer_rate: float = Field(default=0.1, gt=0, le=1, description="fraction of the student's neurons per layer")
    locate_vocab: int | None = Field(
        default=None, ge=1, description="softmax over the top-k logit-lens tokens (and y) when scoring neurons; "
                                        "None: the whole vocabulary (exact, slow on CPU)")
    checkpoint: int = Field(
        default=4, ge=0, description="the official checkpoint_{k} kept: the paper's per-task 'steps' (GSM8K 4, MMLU 2, "
                                     "HumanEval 3, MBPP 8); it holds the hypernetworks after k+1 updates")
    total_steps: int | None = Field(default=None, ge=1,
                                    description="length of the one-cycle schedule (None: one update per extract item, "
                                                "as the official loop)")
    choose: Literal["checkpoint", "validation"] = Field(
        default="checkpoint", description="keep method.checkpoint (official), or train total_steps updates and keep "
                                          "the lowest cross entropy on the held-out align items (ours)")
    locate: Literal["per_example", "averaged"] = Field(
        default="per_example", description="re-locate layers and neurons on each update's extract item (official), or "
                                           "once on scores averaged over the extract items (ours)")
    inject_on: Literal["train_sample", "extract_mean"] = Field(
        default="train_sample", description="where the saved model's injection is located: one training item drawn "
                                            "with the seed (official inference), or the extract items' mean scores")
    lr: float = Field(default=3e-4, gt=0, le=1, description="max lr of the one-cycle schedule (the shipped script's "
                                                            "3e-4; the function's default is 3e-5)")
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_ratio: float = Field(default=0.1, gt=0, lt=1, description="one-cycle pct_start")
    penalty: float = Field(default=1000.0, ge=0, description="weight of the MSE(Δ, 0) per module type")
    partners: int = Field(default=15, ge=0, description="align examples joining each extract example in a batch")
    n_val: int = Field(default=16, ge=1, description="align items held out: validation CE per update (recorded; "
                                                     "the choice with choose: validation); never trained on")
    init_std: float = Field(default=1e-5, gt=0, description="std of the hypernetworks' initial weights")


MethodSpec = Annotated[LoraMethod | PissaMethod | KdMethod | WeightSelectionMethod | SeekingMethod | SemAlignMethod
                       | LatenMethod,
                       Field(discriminator="name")]


# keys a grid entry may not change: the pair, the task and the evaluation protocol are the comparison
FIXED_KEYS = ("teacher", "student", "task", "evaluation", "seed", "output_dir", "compare")
# keys that make up the training budget: changing one needs compare.allow_unequal_budget
BUDGET_KEYS = ("training.epochs", "training.max_steps", "training.lr", "training.batch_size", "training.grad_accum",
               "training.max_length", "training.warmup_ratio", "training.weight_decay", "training.scheduler",
               "lora.r", "lora.alpha", "lora.target_modules", "lora.rank_pattern")


class GridEntry(Strict):
    """One method of a comparison: its spec, an optional label, overrides and a settings sweep.

    In YAML an entry is a method name (``lora``) or a method mapping with optional ``label``,
    ``overrides`` (dotted keys, e.g. ``{training.lr: 5e-5}``) and ``sweep`` (dotted keys to lists of
    values; one entry per combination) mixed in: ``{name: kd, alpha: 0.5, label: kd-0.5}``.
    """

    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$")
    method: MethodSpec
    overrides: dict[str, Any] = Field(default_factory=dict)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"method": {"name": data}}
        if isinstance(data, dict) and "method" not in data and "name" in data:
            rest = dict(data)
            outer = {k: rest.pop(k) for k in ("label", "overrides", "sweep") if k in rest}
            return {**outer, "method": rest}
        return data


class CompareSpec(Strict):
    """``pkt compare``: every entry x every seed on the recipe's pair, task, budget and evaluation."""

    methods: list[GridEntry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    baseline: str = Field(default="lora", description="label the paired differences are taken against")
    allow_unequal_budget: bool = Field(default=False, description="let entries override training budget keys")


class Recipe(Strict):
    teacher: ModelSpec = Field(default_factory=lambda: ModelSpec(model=DEFAULT_TEACHER))
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(model=DEFAULT_STUDENT))
    task: TaskSpec = Field(default_factory=TaskSpec)
    method: MethodSpec = Field(default_factory=LoraMethod)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    seed: int = Field(default=0, ge=0)
    output_dir: str = "runs/run"
    compare: CompareSpec | None = Field(default=None, description="the grid `pkt compare` runs (ignored by `pkt run`)")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Recipe:
        if self.teacher.model == self.student.model and self.teacher.revision == self.student.revision:
            raise ValueError("teacher and student are the same model; a transfer needs two different models")
        return self

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# loading, overrides and readable errors


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Allowed field names of the model found at ``loc`` (for 'did you mean')."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            break
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    fields = getattr(model, "model_fields", None)
    return sorted(fields) if fields else []


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "(recipe)"
        if e["type"] == "extra_forbidden":
            parent, key = loc[:-1], str(loc[-1])
            allowed = _fields_at(parent)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - unknown field '{dotted}'{hint} allowed here: {', '.join(allowed)}")
        else:
            value = e.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            if len(shown) > 80:
                shown = shown[:77] + "..."
            lines.append(f"  - {dotted}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"override '{item}' is not KEY=VALUE", hint="write e.g. --set training.lr=1e-4")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"override '{item}' has an empty key", hint="write e.g. --set training.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"override '{item}': '{part}' is not a section", hint="check the key path")
            node = nxt
        node[path[-1]] = value
    return data


def validate(cls: type[M], data: dict[str, Any], source: str) -> M:
    """Validate ``data`` as ``cls`` (the recipe or one of its sections), with readable errors."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise RecipeError(
            format_validation_error(err, source), hint="see `pkt recipe --schema` for every field"
        ) from None


def recipe_from_dict(data: dict[str, Any], source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    return validate(Recipe, apply_overrides(dict(data), overrides or []), source)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe file (``None``: the defaults), applying ``KEY=VALUE`` overrides."""
    if path is None:
        return recipe_from_dict({}, "defaults", overrides)
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file '{p}' does not exist",
                          hint="pass the path of a YAML recipe, e.g. recipes/quickstart.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe '{p}' is not UTF-8 text (byte {err.start})",
                          hint="save the recipe as UTF-8 YAML") from None
    except OSError as err:
        raise RecipeError(f"recipe '{p}' cannot be read: {err.strerror or err}", hint="check the file's permissions") from None
    if not text.strip():
        raise RecipeError(f"recipe '{p}' is empty",
                          hint="write at least the sections you want (see recipes/quickstart.yaml); "
                               "`pkt recipe` prints every default")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe '{p}' is not valid YAML{where}: {getattr(err, 'problem', err)}",
                          hint="fix the YAML syntax (indentation, colons, quotes)") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe '{p}' must be a mapping of sections, got {type(data).__name__}",
                          hint="start the file with keys such as 'student:', 'task:', 'method:'")
    return recipe_from_dict(data, str(p), overrides)


def save_recipe(recipe: Recipe, path: Path) -> None:
    from pktransfer.fileio import write_text

    write_text(path, yaml.safe_dump(recipe.dump(), sort_keys=False))
