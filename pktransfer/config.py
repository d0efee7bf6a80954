"""The sections of a recipe (models, task, LoRA, training, evaluation), the base of every method's config, and
the registry of method configs the recipe's ``method`` field accepts.

Each method's own config class lives in its module under ``pktransfer/methods/`` (e.g. ``SeekingConfig``
in ``methods/seeking.py``); registering a method (``pktransfer.methods.registry.register``) files its config
here with its roles, and the recipe's ``method`` union is assembled from them. This module sits below both the
recipe and the methods, so neither reaches back to the other. Every model forbids unknown keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pktransfer.models.builtin import DEFAULT_STUDENT, DEFAULT_TEACHER  # noqa: F401  (re-exported defaults)

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
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str] | None = Field(
        default=None,
        description="shard the model over devices through accelerate (a teacher bigger than one device): 'auto', "
        "'balanced', 'sequential', or module -> device (0, 'cuda:1', 'cpu', 'disk'); None: the whole model on `device`",
    )
    max_memory: dict[int | str, str] | None = Field(
        default=None, description="per-device caps for device_map, e.g. {0: '20GiB', 1: '20GiB', cpu: '64GiB'}"
    )
    offload_folder: str | None = Field(
        default=None, description="folder for weights device_map offloads to disk (module -> 'disk', or max_memory overflow)"
    )

    def identity(self) -> dict[str, Any]:
        """What the model computes, not where it sits: cache keys use this, so a sharded teacher reuses (and is
        tested to reproduce) what the unsharded one computed."""
        return self.model_dump(exclude={"device_map", "max_memory", "offload_folder"})

    @model_validator(mode="after")
    def _sharding_needs_a_map(self) -> ModelSpec:
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ValueError("max_memory and offload_folder shard a model: set device_map too (e.g. device_map: auto)")
        return self


# fields added to a section after cache folders were first named from a hash of it: left out of such names while at
# these values, so a cache made before the field existed keeps serving the same work
NEUTRAL_DEFAULTS: dict[str, Any] = {"task.tulu_variant": None, "task.tulu_eval_variant": "open-instruct"}


def hash_view(section: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a dumped recipe section) without the fields of :data:`NEUTRAL_DEFAULTS` at their neutral values."""
    neutral = {k.split(".", 1)[1]: v for k, v in NEUTRAL_DEFAULTS.items() if k.split(".", 1)[0] == section}
    return {k: v for k, v in data.items() if not (k in neutral and neutral[k] == v)}


# the official assemblies of the Tulu chat format (pktransfer.data.formatting.TULU_VARIANTS)
TuluVariantName = Literal["seeking", "seeking-extract", "laten", "open-instruct"]


class TaskSpec(Strict):
    """A task from the registry (``pkt tasks``) and its split sizes."""

    name: str = "arithmetic"
    data_dir: str | None = Field(
        default=None, description="folder with the benchmark data (default: $PKT_DATA_DIR, else pktransfer's cache)"
    )
    n_train: int | None = Field(default=None, ge=1, description="cap on training items (None: the whole split)")
    n_test: int | None = Field(default=None, ge=1, description="cap on test items (None: the whole split)")
    validation: int | None = Field(
        default=None,
        ge=1,
        description="items of a 'validation' split for tuning (pkt compare's tune): the task's own validation split, "
        "or the last N items of its train split, which training then never sees",
    )
    prompt_format: Literal["auto", "chat", "plain", "tulu"] = Field(
        default="auto",
        description="auto (the model's chat template if it has one, else plain), chat, plain, or tulu: the Tulu chat "
        "format the papers' official code trains and evaluates with (docs/reproduce.md)",
    )
    tulu_variant: TuluVariantName | None = Field(
        default=None,
        description="with prompt_format tulu: the official assembly of training text (None: the method's own -- laten "
        "for LaTen, seeking otherwise; Seeking's sensitivity always uses seeking-extract, as its extraction script does)",
    )
    tulu_eval_variant: TuluVariantName | Literal["plain", "chat"] = Field(
        default="open-instruct",
        description="with prompt_format tulu: the assembly of evaluation prompts (Open-Instruct's Tulu format), plain: "
        "the raw prompt (Open-Instruct evaluates HumanEval without the chat format), or chat: the model's own chat "
        "template (Open-Instruct's Llama-2-Chat format for a Llama-2-Chat model; docs/reproduce.md)",
    )
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
    max_steps: int | None = Field(
        default=None, ge=0, description="overrides epochs when set; 0: no training (a start evaluated as it is built)"
    )
    lr: float = Field(default=3e-4, gt=0, le=1)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    steps_per_epoch: Literal["ceil", "floor"] = Field(
        default="ceil",
        description="with epochs: ceil: an epoch's last, partial accumulation window makes a step of its own "
        "(transformers today); floor: it does not, as in the 2023 Trainer: max(ceil(n / batch_size) // grad_accum, 1) "
        "steps per epoch, epochs x that in all (the Seeking recipes: 45 steps for 1,000 items at 64, not 48)",
    )
    loss_averaging: Literal["tokens", "micro_batch"] = Field(
        default="tokens",
        description="with grad_accum > 1: tokens: the cross entropy averaged over every response token of the "
        "accumulated batch (transformers' exact accumulation); micro_batch: each micro-batch's token mean, averaged "
        "over the micro-batches (the Trainer of 2023, which the Seeking recipes reproduce)",
    )
    max_length: int = Field(default=512, ge=8, description="cutoff in tokens (prompt + response)")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    save_steps: int = Field(default=50, ge=1, description="checkpoint interval for resume")
    logging_steps: int = Field(default=5, ge=1)
    gradient_checkpointing: bool = False
    fast_path: bool = Field(
        default=True,
        description="on CPU: LoRA dropout masks drawn through geometric gaps (same distribution, ~p·n random numbers), "
        "and with a bfloat16 student bf16 autocast (no fp32 copies of activations for the fp32 LoRA weights), the "
        "attention kernel of cpu_attention, and logits only where the plain loss reads them; false: the plain path "
        "(records made before this option ran it)",
    )
    fused_step: bool = Field(
        default=True,
        description="with fast_path on CPU: each plain LoRA linear's training forward and backward as one function "
        "(pktransfer.ops.fused_lora: dropout's and LoRA's scalars folded into A and B, the additions fused into the "
        "matrix products; same function, same dropout mask) and AdamW's update as torch's fused kernel (same "
        "update); only the rounding order differs; false: peft's separate operators and the per-tensor AdamW "
        "(records made before this option ran them)",
    )
    cpu_attention: Literal["auto", "math", "flash"] = Field(
        default="auto",
        description="with fast_path on a bfloat16 student on CPU: the attention kernel of training; auto: torch's math "
        "kernel for batches of up to 192 tokens (faster at ~50; not distinguishable at 128-256) and its flash kernel above "
        "(faster and smaller: a batch of 8 x 512 took 21.1 s and 9.1 GiB against 32.7 s and 11.8 GiB, "
        "bench/cpu_attention.py); math: every batch (records made before this option ran it); flash: every batch. "
        "Same function, other rounding order",
    )
    save_merged: bool = Field(default=False, description="also write a merged full model")


class EvaluationSpec(Strict):
    splits: list[str] = Field(default_factory=lambda: ["test"], min_length=1)
    limit: int | None = Field(default=None, ge=1, description="evaluate only N items (the first N, or a seeded draw)")
    subset_seed: int | None = Field(default=None, description="with limit: draw the N items with this seed")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=16, description="or 'auto': the largest that fits (CUDA)"
    )
    n_samples: int = Field(default=1, ge=1, description="code tasks: completions per problem (pass@k for k <= n)")
    temperature: float = Field(default=0.8, ge=0, description="code tasks: sampling temperature when n_samples > 1")
    top_p: float = Field(default=1.0, gt=0, le=1, description="code tasks: nucleus sampling when n_samples > 1 (1: off)")
    allow_code_execution: bool = Field(default=False, description="run generated code (sandboxed) for code tasks")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="generation budget (None: the task's own, e.g. 12 for arithmetic)"
    )
    learning_curve: int = Field(
        default=0,
        ge=0,
        le=20,
        description="score the validation split at every 1/N of the training steps while training (N points, the last "
        "at the end; 0: off), e.g. 3 for the accuracy at each third of the budget; needs task.validation",
    )
    backend: Literal["auto", "hf", "vllm"] = Field(
        default="auto",
        description="generation engine: hf (transformers' generate), vllm (vLLM's engine: install the vllm extra; a "
        "trained student is evaluated from a merged copy, kept as merged/), or auto: vllm on CUDA where it is "
        "installed, else hf. Log-likelihood scoring (multiple choice) always runs on hf",
    )
    dtype: Literal["auto", "as-is", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="the dtype models are scored in. auto: the teacher and the untouched student in their recipe "
        "dtype, the trained student in the untouched student's (a method that works in another dtype, LaTen's "
        "float32, is cast back, so before and after are scored alike); a dtype: every evaluated model in it "
        "(float16: Open-Instruct's, the paper recipes' setting). Parameters are cast, buffers kept. as-is: each model "
        "in the dtype it holds (what runs before this field did: LaTen's trained student in float32)",
    )
    teacher: bool = Field(default=True, description="also evaluate the teacher")
    student: bool = Field(default=True, description="also evaluate the untouched student")


def _plant_lora() -> LoraSpec:
    return LoraSpec(r=16, alpha=32.0, dropout=0.0)


def _plant_training() -> TrainingSpec:
    return TrainingSpec(epochs=8, lr=5e-4, batch_size=8, max_length=128, warmup_ratio=0.03, scheduler="cosine")


class PlantSpec(Strict):
    """``pkt plant``: fine-tune the teacher on every fact of a planted task (training templates only), so that the B
    facts live in the teacher's weights alone. The feasibility pilot on the offline 0.5B student (40 facts, LoRA r 16
    on all projections, lr 5e-4, batch 8) reached 98% on held-out templates after 4 epochs; the defaults double that."""

    output_dir: str = Field(default="runs/planted-teacher", description="where the planted teacher is written")
    base: ModelSpec | None = Field(
        default=None,
        description="the teacher to plant (default: the recipe's teacher); a study names the planted teacher "
        "(OUTPUT/merged) as its teacher and the untouched one here, so one recipe describes both",
    )
    lora: LoraSpec = Field(default_factory=_plant_lora, description="the teacher's adapter (its delta)")
    training: TrainingSpec = Field(default_factory=_plant_training, description="the planting budget")
    min_recall: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="refuse a planted teacher whose recall on the test facts (held-out templates) is lower (0: never)",
    )
    splits: list[str] = Field(
        default_factory=lambda: ["a_test", "validation", "test"],
        min_length=1,
        description="the splits recall is measured on, each with held-out templates (the untouched models too)",
    )
    chance_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="refuse when an untouched model is above chance on a split: one-sided exact binomial test, "
        "Bonferroni over the models x splits",
    )

    def result_fields(self) -> dict[str, Any]:
        """What a planting's results depend on (its folder's marker records these): everything but where it goes."""
        return self.model_dump(mode="json", exclude={"output_dir"})


class MethodConfig(Strict):
    """Base of every method's config: ``name`` is the method's registered name (a Literal in each subclass).

    A config with ``role_fields`` (field -> role, e.g. ``{"start": "start"}``) holds other methods' configs in
    those fields: each accepts exactly the registered configs of that role, rebuilt as methods are registered."""

    role_fields: ClassVar[dict[str, str]] = {}
    name: str

    def label(self) -> str:
        """How reports name this method when an entry gives no label."""
        return self.name


# ---- the registry of method configs ----------------------------------------------------------------------

_CONFIGS: dict[str, tuple[type[MethodConfig], frozenset[str]]] = {}
_LISTENERS: list[Callable[[], None]] = []


def register_config(config: type[MethodConfig], roles: frozenset[str] = frozenset()) -> None:
    """File a method's config under its name (a second one under the same name is refused)."""
    name = config_name(config)
    if name in _CONFIGS:
        raise ValueError(f"a method named '{name}' is already registered ({_CONFIGS[name][0].__name__})")
    _CONFIGS[name] = (config, frozenset(roles))
    _rebuild()


def unregister_config(name: str) -> None:
    _CONFIGS.pop(name, None)
    _rebuild()


def config_name(config: type[MethodConfig]) -> str:
    default = config.model_fields["name"].default
    if not isinstance(default, str) or not default:
        raise TypeError(f"{config.__name__} must declare name: Literal['...'] = '...'")
    return default


def config_class(name: str) -> type[MethodConfig]:
    return _CONFIGS[name][0]


def config_union(role: str | None = None) -> Any:
    """The registered configs (of ``role``, or all) as one pydantic type, discriminated by ``name``."""
    configs = [c for c, roles in _CONFIGS.values() if role is None or role in roles]
    if not configs:
        return MethodConfig
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[tuple(configs)], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple of types)


def on_configs_change(listener: Callable[[], None]) -> None:
    """``listener()`` runs whenever the set of registered configs changes (the recipe rebuilds its union)."""
    _LISTENERS.append(listener)


def _rebuild() -> None:
    # configs that hold other configs first, so the recipe's union embeds their current schema
    for config, _ in _CONFIGS.values():
        if config.role_fields:
            for field, role in config.role_fields.items():
                config.model_fields[field].annotation = config_union(role)
            config.model_rebuild(force=True)
    for listener in _LISTENERS:
        listener()
