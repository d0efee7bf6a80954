"""The YAML recipe: one pydantic schema, the single source of truth for a run.

A recipe names teacher, student, task, method (with its parameters), LoRA and training arguments,
evaluation, seed and output folder. Unknown keys are rejected; a validation error names the field, the
bad value and what is allowed. CLI overrides (``--set training.lr=1e-4``) are applied to the raw
mapping before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pktransfer import config as configs
from pktransfer.config import (  # noqa: F401  (re-exported: recipes are built from these sections)
    DeviceName,
    DTypeName,
    EvaluationSpec,
    LoraSpec,
    MethodConfig,
    ModelSpec,
    PlantSpec,
    Strict,
    TaskSpec,
    TrainingSpec,
)
from pktransfer.errors import RecipeError
from pktransfer.models.builtin import DEFAULT_STUDENT, DEFAULT_TEACHER

M = TypeVar("M", bound=BaseModel)
# every registered method's config, discriminated by ``name`` (rebuilt when a method is registered)
MethodSpec = configs.config_union()

# fields added after records were first made, with the value that reproduces what a record lacking them computed
# (``runs.as_current_schema`` reads old records with these, so a record is never matched to a recipe that would now
# compute something else)
# (``method[NAME].key``: only where the recorded method is NAME)
LEGACY_DEFAULTS: dict[str, Any] = {
    "training.fast_path": False,
    "training.fused_step": False,
    "training.cpu_attention": "math",
    "method[laten].data_order": "file",
    "method[laten].attn_score": "o_input",
    "method[laten].neuron_count": "round",
    "method[laten].n_val": 16,
    "method[laten].score_decimals": None,
    "evaluation.dtype": "as-is",  # every model was scored in the dtype it held (LaTen's trained student in float32)
    # (method[seeking].maps is not here: selected_layers computes the same layers and maps as the all_layers records did,
    # to the bit, tests/test_seeking.py; only its memory and its second pass differ)
}

# keys a grid entry may not change: the pair, the task and the evaluation protocol are the comparison
FIXED_KEYS = ("teacher", "student", "task", "evaluation", "seed", "output_dir", "compare")
# keys that make up the training budget: changing one needs compare.allow_unequal_budget
BUDGET_KEYS = (
    "training.epochs",
    "training.max_steps",
    "training.lr",
    "training.batch_size",
    "training.grad_accum",
    "training.max_length",
    "training.warmup_ratio",
    "training.weight_decay",
    "training.scheduler",
    "lora.r",
    "lora.alpha",
    "lora.target_modules",
    "lora.rank_pattern",
)


class TuneSpec(Strict):
    """``compare.tune``: choose one key's value per entry on the validation split, one seed, before the grid.

    Each value is trained with ``seed`` and scored on ``task.validation`` items (never the test split); the
    value with the highest validation accuracy is then run on every seed. Ties go to the value listed first,
    so list the value you would pick without tuning first.
    """

    key: str = Field(default="training.lr", description="a dotted recipe key, e.g. training.lr or method.temperature")
    values: list[Any] = Field(min_length=1, description="the candidates, in order of preference for ties")
    seed: int | None = Field(default=None, ge=0, description="the tuning seed (default: the first of compare.seeds)")

    @model_validator(mode="after")
    def _check(self) -> TuneSpec:
        top = self.key.split(".", 1)[0]
        if top in FIXED_KEYS or self.key in ("method", "method.name"):
            raise ValueError(f"tune.key '{self.key}' is part of what every cell shares; tune a training or method key")
        if len({json.dumps(v, sort_keys=True) for v in self.values}) != len(self.values):
            raise ValueError(f"tune.values {self.values} repeats a value")
        return self


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
    tune: TuneSpec | Literal[False] | None = Field(
        default=None, description="this entry's tuning (None: compare.tune; false: run untuned, e.g. LaTen)"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"method": {"name": data}}
        if isinstance(data, dict) and "method" not in data and "name" in data:
            rest = dict(data)
            outer = {k: rest.pop(k) for k in ("label", "overrides", "sweep", "tune") if k in rest}
            return {**outer, "method": rest}
        return data


class BudgetSpec(Strict):
    """``compare.budget``: a cost rule declared before any result is seen, applied by code.

    Before any other work ``pkt compare`` runs one pilot cell (the baseline's first tuning cell, else its first grid
    cell), measures its training seconds and evaluation seconds per item, and estimates the whole grid: per entry
    ``cost_factors[label]`` x the pilot's training time per cell plus its evaluation items, and the untouched models'
    evaluation. While the estimate exceeds ``hours``, the entries of ``cut_order`` are dropped, first to last. The
    decision is written to ``budget.json`` and kept for every later sitting (it is never re-made once results exist).
    """

    hours: float = Field(gt=0, description="the grid's wall-clock budget on the machine that runs the pilot")
    cut_order: list[str] = Field(default_factory=list, description="entry labels to drop, first to last, while over budget")
    cost_factors: dict[str, float] = Field(
        default_factory=dict, description="label -> training cost per cell relative to the baseline's (default 1)"
    )
    teacher_eval_factor: float = Field(
        default=3.0, gt=0, description="the teacher's evaluation cost per item relative to the student's"
    )
    refill: bool = Field(
        default=False,
        description="after the cut, take back each dropped entry that fits in what is left, the last dropped first "
        "(the cut order's most valued): a cheap entry early in the order is not lost to an expensive one later",
    )


class CompareSpec(Strict):
    """``pkt compare``: every entry x every seed on the recipe's pair, task, budget and evaluation."""

    methods: list[GridEntry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    baseline: str = Field(default="lora", description="label the paired differences are taken against")
    allow_unequal_budget: bool = Field(default=False, description="let entries override training budget keys")
    tune: TuneSpec | None = Field(default=None, description="tune every entry on validation before the grid")
    bootstrap: int = Field(default=10000, ge=100, description="paired bootstrap resamples (items x seeds)")
    matched: list[tuple[str, str]] = Field(
        default_factory=list,
        description="pairs of entry labels whose contrast isolates one factor (e.g. [seeking, seeking-random]): where "
        "tuning chose different values for them, each also runs at the other's values, so the pair can be compared "
        "at either (secondary cells, outside the family of comparisons with the baseline)",
    )
    # the primary analysis, declared before the grid runs
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="family-wise error rate of the comparisons with the baseline")
    adjustment: Literal["holm", "none"] = Field(
        default="holm", description="multiple-comparison adjustment of the bootstrap p-values against the baseline"
    )
    equivalence_margin: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="TOST margin in accuracy (0.03 = 3 points): a pair is called equivalent only when its (1 − 2α) "
        "bootstrap interval lies inside ±margin",
    )
    budget: BudgetSpec | None = Field(default=None, description="a cost rule applied after one pilot cell (see BudgetSpec)")
    against_chance: bool = Field(
        default=False,
        description="also test every entry against the task's chance level (its protocol's `chance`, e.g. 1/K for a "
        "K-candidate ranking): accuracy − chance by the bootstrap over items x seeds, Holm over the entries",
    )


class Recipe(Strict):
    teacher: ModelSpec = Field(default_factory=lambda: ModelSpec(model=DEFAULT_TEACHER))
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(model=DEFAULT_STUDENT))
    task: TaskSpec = Field(default_factory=TaskSpec)
    method: MethodSpec = Field(default_factory=lambda: configs.config_class("lora")())
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    seed: int = Field(default=0, ge=0)
    output_dir: str = "runs/run"
    compare: CompareSpec | None = Field(default=None, description="the grid `pkt compare` runs (ignored by `pkt run`)")
    plant: PlantSpec | None = Field(
        default=None, description="`pkt plant`: how the teacher is given a planted task's facts (ignored by `pkt run`)"
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Recipe:
        if self.teacher.model == self.student.model and self.teacher.revision == self.student.revision:
            raise ValueError("teacher and student are the same model; a transfer needs two different models")
        if self.student.device_map is not None:
            raise ValueError(
                "student.device_map: the student trains whole on one device; shard the teacher (teacher.device_map), "
                "and train on several GPUs with `accelerate launch` (see the README)"
            )
        return self

    def dump(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if data["plant"] is None:  # absent unless set: recipes and records made before the section existed read the same
            del data["plant"]
        return data


def _rebuild_method_union() -> None:
    """Accept exactly the registered methods' configs in recipes and comparison entries."""
    global MethodSpec
    MethodSpec = configs.config_union()
    GridEntry.model_fields["method"].annotation = MethodSpec
    Recipe.model_fields["method"].annotation = MethodSpec
    for model in (GridEntry, CompareSpec, Recipe):
        model.model_rebuild(force=True)


configs.on_configs_change(_rebuild_method_union)
_rebuild_method_union()


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
        raise RecipeError(format_validation_error(err, source), hint="see `pkt recipe --schema` for every field") from None


def recipe_from_dict(data: dict[str, Any], source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    return validate(Recipe, apply_overrides(dict(data), overrides or []), source)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe file (``None``: the defaults), applying ``KEY=VALUE`` overrides."""
    if path is None:
        return recipe_from_dict({}, "defaults", overrides)
    p = Path(path)
    if not p.is_file():
        raise RecipeError(
            f"recipe file '{p}' does not exist", hint="pass the path of a YAML recipe, e.g. recipes/quickstart.yaml"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe '{p}' is not UTF-8 text (byte {err.start})", hint="save the recipe as UTF-8 YAML") from None
    except OSError as err:
        raise RecipeError(f"recipe '{p}' cannot be read: {err.strerror or err}", hint="check the file's permissions") from None
    if not text.strip():
        raise RecipeError(
            f"recipe '{p}' is empty",
            hint="write at least the sections you want (see recipes/quickstart.yaml); `pkt recipe` prints every default",
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(
            f"recipe '{p}' is not valid YAML{where}: {getattr(err, 'problem', err)}",
            hint="fix the YAML syntax (indentation, colons, quotes)",
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(
            f"recipe '{p}' must be a mapping of sections, got {type(data).__name__}",
            hint="start the file with keys such as 'student:', 'task:', 'method:'",
        )
    return recipe_from_dict(data, str(p), overrides)


def save_recipe(recipe: Recipe, path: Path) -> None:
    from pktransfer.fileio import write_text

    write_text(path, yaml.safe_dump(recipe.dump(), sort_keys=False))
