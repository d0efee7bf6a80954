"""``pkt plan``: each stage's peak memory and time, from the recipe and the models' configs alone (no weights).

The models are built on the meta device and every working set that depends on the model's code (a LoRA training
step, a forward for logits or for a generation's prefill, a teacher's backward) is *traced*: the same modules run
on fake tensors (``torch._subclasses.FakeTensorMode``, no memory, no arithmetic) while a dispatch mode adds up the
bytes of every tensor alive, so the peak is the one the real code reaches, allocator slack aside. What the traces
do not cover is counted from the method's spec (Seeking's maps, SemAlign's bases, LaTen's hypernetworks) and named
in the stage's terms.

Memory per stage is what a run holds at its peak in that stage (the models resident then plus the stage's own
working set), the quantity ``run.json`` reports per stage (``peak_cuda_gib`` on a GPU). Time is an order of
magnitude: floating-point work over the device's matmul rate, and a generation's decode steps over its memory
bandwidth (measured on this CPU, from a table for GPUs, or given).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from pktransfer.config import ModelSpec
from pktransfer.errors import ModelError, RecipeError
from pktransfer.recipe import Recipe

GIB = 2**30


# ---- counting the bytes alive while fake modules run -------------------------------------------------------------
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the storage bytes of every tensor an operator creates while active, frees them when their storage
    dies, and keeps the peak (tensors that existed before are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, Any]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_flatten((args, kwargs))[0]
        # a view or an in-place result holds an input's storage: counted with it, or existing before (a weight)
        held = {t.untyped_storage()._cdata for t in flat_in if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in held:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        n = storage.nbytes()
        self.live[key] = (n, weakref.ref(storage, lambda _ref, k=key: self._free(k)))
        self.current += n
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        n, _ = self.live.pop(key, (0, None))
        self.current -= n


@contextmanager
def fake_mode(device: torch.device | None = None) -> Iterator[Any]:
    """Fake tensors (on the CPU's kernels). Planning for a GPU, attention is traced through the flash kernel, as
    torch's scaled-dot-product attention runs there (the CPU's math kernel would hold every layer's
    batch x heads x length² probabilities, which no GPU run does)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gpu = device is not None and device.type == "cuda"
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        if gpu:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                yield mode
        else:
            yield mode


def traced_peak(run: Callable[[], Any]) -> int:
    """The peak bytes of the tensors ``run`` creates (call it inside :func:`fake_mode`)."""
    with LiveBytes() as live:
        run()
    return live.peak


# ---- the models, without weights ---------------------------------------------------------------------------------
@dataclass
class ModelShape:
    label: str
    config: Any
    arch: Any  # ArchitectureDescription
    dtype: torch.dtype
    n_params: int
    weight_bytes: int

    def meta_model(self, dtype: torch.dtype | None = None) -> Any:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config, dtype=dtype or self.dtype)

    def bytes_in(self, dtype: torch.dtype) -> int:
        return self.n_params * _size(dtype)

    def kv_bytes(self, batch: int, tokens: int) -> int:
        a = self.arch
        return 2 * a.n_layers * a.n_kv_heads * a.head_dim * batch * tokens * _size(self.dtype)

    def layer_projection_params(self) -> int:
        return sum(math.prod(w.shape) for w in self.arch.layer_weights(0) if len(w.shape) == 2)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_shape(spec: ModelSpec, label: str, device: torch.device, notes: list[str] | None = None) -> ModelShape:
    from transformers import AutoConfig

    from pktransfer.models.arch import check_family, describe_config
    from pktransfer.models.loading import resolve_dtype, resolve_source
    from pktransfer.models.paper_configs import paper_config

    notes = notes if notes is not None else []
    source = resolve_source(spec.model, prepare=True)
    try:  # a folder or the hub's cache first; a paper model's shape from the table before asking the hub
        config = AutoConfig.from_pretrained(source, revision=spec.revision, local_files_only=True)
    except (OSError, ValueError):
        config = None
    try:
        config = config or paper_config(spec.model) or AutoConfig.from_pretrained(source, revision=spec.revision)
    except (OSError, ValueError) as err:
        if config is None:
            raise ModelError(
                f"model '{spec.model}': its config could not be read ({str(err).splitlines()[0]})",
                hint="check the name, pass a local folder, or go online once so the hub caches the config",
            ) from None
    if not hasattr(config, "_name_or_path") or not config._name_or_path:
        notes.append(f"{label}: {spec.model}'s config from pktransfer's table of the paper models (not found locally)")
    check_family(config, repr(spec.model))
    if device.type == "cuda" and spec.dtype == "auto" and not torch.cuda.is_available():
        dtype = torch.bfloat16  # planned for a GPU from a machine without one: every GPU the table knows has bf16
    else:
        dtype = resolve_dtype(spec.dtype, device)
    shape = ModelShape(label, config, None, dtype, 0, 0)
    model = shape.meta_model()
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            shape.weight_bytes += t.numel() * t.element_size()
            shape.n_params += t.numel() if isinstance(t, torch.nn.Parameter) else 0
    shape.arch = describe_config(config, repr(spec.model), shape.n_params)
    return shape


# ---- traced working sets -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One batch's shape as the plan traces it: rows, padded length, and how many positions predict a response."""

    rows: int
    length: int
    response: int  # response positions per row (the plain loss's logits are upcast there only)

    def tensors(self) -> dict[str, torch.Tensor]:
        ids = torch.zeros(self.rows, self.length, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        labels[:, self.length - self.response :] = 0
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _lora_model(shape: ModelShape, recipe: Recipe, meta: bool = True, layers: list[int] | None = None) -> Any:
    """``layers``: the layers the LoRA is on (None: every layer)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pktransfer.training import lora_config

    base = shape.meta_model() if meta else AutoModelForCausalLM.from_config(shape.config, dtype=shape.dtype)
    config = lora_config(recipe.lora, shape.arch)
    if layers is not None:
        config.layers_to_transform = layers
    return get_peft_model(base, config)


def trained_lora(recipe: Recipe, teacher: ModelShape | None, student: ModelShape) -> tuple[Recipe, list[int] | None, str]:
    """The LoRA a method trains, where it is not ``recipe.lora`` on every layer: (the recipe with that LoRA, its layers,
    a note). SemAlign trains its own targets on the paired layers only; which layers those are is chosen from the seed
    items, so they are planned as the shallowest ones (the backward reaches furthest down: the largest step)."""
    spec = recipe.method
    if spec.name == "compose":
        return trained_lora(recipe.model_copy(update={"method": spec.start}), teacher, student)
    if spec.name != "semalign":
        return recipe, None, ""
    if spec.target_modules is not None:
        recipe = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"target_modules": list(spec.target_modules)})})
    if spec.lora_layers == "all" or spec.version == "v2" or not isinstance(spec.critical_layers, int):
        return recipe, None, ""
    n_t = teacher.arch.n_layers if teacher is not None else student.arch.n_layers
    k = min(spec.critical_layers, n_t, student.arch.n_layers)
    note = (f"semalign: LoRA on the {k} paired student layers, planned as the {k} shallowest (the layers are chosen "
            "from the seed items; deeper ones need a shorter backward)")  # fmt: skip
    return recipe, list(range(k)), note


def _train_step(model: Any, recipe: Recipe, batch: Batch, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """One training step as the trainer takes it on ``device``: the fast path's LoRA modules, loss and attention
    kernel on CPU, the model's own loss elsewhere; AdamW over the LoRA."""
    from pktransfer.training import cpu_bf16_training, fast_path, response_ce

    spec = recipe.training
    if device.type == "cpu" and spec.fast_path:
        fast_path(model)
        if spec.fused_step:
            from pktransfer.ops.fused_lora import fuse_lora_layers

            fuse_lora_layers(model)
    cpu_fast = device.type == "cpu" and spec.fast_path and dtype == torch.bfloat16
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = batch.tensors()

    # on a GPU the trainer runs a half-precision model under autocast (its bf16 / fp16 mixed precision)
    mixed = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)

    def step() -> None:
        if cpu_fast:
            with cpu_bf16_training(model, spec.cpu_attention, batch.length):
                keep = torch.arange(batch.length - batch.response - 1, batch.length - 1)  # the batch's response
                ids = {k: v for k, v in inputs.items() if k != "labels"}
                total = response_ce(model, ids, inputs["labels"], keep)[0]
        elif mixed:
            with torch.autocast("cpu", dtype=dtype):  # the fake tensors live on the CPU's kernels
                total = model(**inputs).loss
        else:
            total = model(**inputs).loss
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step_peak(
    shape: ModelShape, recipe: Recipe, batch: Batch, device: torch.device, layers: list[int] | None = None
) -> tuple[int, int]:
    """(peak bytes of one LoRA training step beyond the weights, traced: activations, gradients, AdamW's moments;
    the LoRA weights' bytes). ``layers``: the layers the LoRA is on (None: every layer)."""
    model = _lora_model(shape, recipe, layers=layers)
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    with fake_mode(device), _expected_dropout():
        model.to_empty(device="cpu")
        return traced_peak(_train_step(model, recipe, batch, device, shape.dtype)), lora_bytes


def real_train_step_peak(shape: ModelShape, recipe: Recipe, batch: Batch) -> int:
    """The same step on real tensors (random weights) on CPU, counted by the same :class:`LiveBytes`: what the
    traced figure is checked against on models small enough to build (bench/plan_check.py --tiny, the tests)."""
    torch.manual_seed(0)
    model = _lora_model(shape, recipe, meta=False)
    step = _train_step(model, recipe, batch, torch.device("cpu"), shape.dtype)
    return traced_peak(step)


def real_forward_peak(shape: ModelShape, batch: Batch) -> int:
    """A generation prefill (:func:`forward_peak` with ``logits='last'``) on real tensors, counted alike."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(shape.config, dtype=shape.dtype).eval()
    ids = batch.tensors()["input_ids"]

    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1, use_cache=True)

    return traced_peak(run)


@contextmanager
def _expected_dropout() -> Iterator[None]:
    """The fast path draws a dropout mask as the dropped positions (their number is random, which a fake tensor
    cannot have): traced with the expected count, round(p·n) int64 positions."""
    from unittest import mock

    import pktransfer.ops.fused_lora  # noqa: F401  (imported first, so that it binds the real function, restored after)

    def expected(n: int, p: float, generator: Any = None) -> torch.Tensor:
        return torch.empty(round(n * p), dtype=torch.long)

    with (
        mock.patch("pktransfer.ops.dropout.dropped_positions", expected),
        mock.patch("pktransfer.ops.fused_lora.dropped_positions", expected),
    ):
        yield


def forward_peak(
    shape: ModelShape,
    batch: Batch,
    *,
    logits: str = "last",
    dtype: torch.dtype | None = None,
    backward: bool = False,
    device: torch.device | None = None,
    checkpointing: bool = False,
) -> int:
    """Peak bytes of one forward beyond the weights: ``logits`` ``last`` (a generation's prefill, with its KV cache),
    ``all`` (every position's logits, upcast to float32 as log-likelihood scoring and distillation read them) or
    ``response``; ``backward``: then a backward to the inputs' activations (gradients through a frozen model);
    ``checkpointing``: that backward recomputes each layer's activations (as Seeking's sensitivity pass with
    ``method.gradient_checkpointing``: train mode, dropout off)."""
    model = shape.meta_model(dtype)
    ids = batch.tensors()["input_ids"]
    model.requires_grad_(False)  # frozen: a backward reaches the activations (a method's hooks hold its own terms)
    with fake_mode(device):
        model.to_empty(device="cpu")
        model.eval()
        if backward and checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.eval()

        def run() -> None:
            keep = {"last": 1, "all": 0, "response": batch.response}[logits]
            if backward:
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                out = model(inputs_embeds=emb, logits_to_keep=keep, use_cache=False)
                out.logits.float().logsumexp(-1).sum().backward()
                return
            with torch.no_grad():
                out = model(input_ids=ids, logits_to_keep=keep, use_cache=logits == "last")
                if logits != "last":
                    torch.log_softmax(out.logits.float(), -1)

        return traced_peak(run)


# ---- the workload's shapes, from the recipe's data -----------------------------------------------------------------
@dataclass
class Workload:
    """The lengths a run meets: its longest training batch and evaluation prompts (read from the task's items and
    the student's tokenizer where they are reachable, else bounded by ``training.max_length``)."""

    train: Batch
    train_tokens: int  # every training example's tokens, one epoch
    n_train: int
    eval_items: int
    prompt: int  # the longest evaluation prompt
    prompt_tokens: int  # all evaluation prompts' tokens
    new_tokens: int
    choice: bool
    source: str  # where the lengths came from


def workload(recipe: Recipe, tokenizer: str | None = None) -> Workload:
    """``tokenizer``: measure the lengths with this model's tokenizer instead of the student's (a stand-in where the
    student's cannot be reached; the plan says which one measured)."""
    from pktransfer.data import get_task, train_and_validation
    from pktransfer.evaluation.recipe_eval import _eval_items, eval_options

    task = get_task(recipe.task.name, recipe.task.params, recipe.task.data_dir)
    train_items, _ = train_and_validation(task, recipe.task.n_train, recipe.task.validation)
    ev = recipe.evaluation
    items = [it for split in ev.splits for it in _eval_items(task, split, recipe)] * max(ev.n_samples, 1)
    new = eval_options(recipe, task).max_new_tokens
    rows = min(recipe.training.batch_size, max(len(train_items), 1))
    choice = task.kind == "choice" and not task.choice_generates
    try:
        formatter = _formatter(recipe, task, tokenizer)
    except (OSError, ValueError) as err:  # no tokenizer reachable (a hub model offline): lengths bounded by the cutoff
        cut = recipe.training.max_length
        return Workload(
            Batch(rows, cut, cut // 2), len(train_items) * cut, len(train_items), len(items), cut, len(items) * cut,
            new, choice, f"bounded by training.max_length ({type(err).__name__}: the tokenizer was not reachable)",
        )  # fmt: skip
    from pktransfer.data.formatting import encode_items
    from pktransfer.evaluation.evaluate import model_input

    examples = encode_items(formatter, train_items, recipe.training.max_length, f"task '{task.name}' train split")
    lengths = sorted((len(e.input_ids), sum(x != -100 for x in e.labels)) for e in examples)
    longest = lengths[-rows:]
    prompts = [len(formatter.encode_text(model_input(formatter, task, it))) for it in items]
    return Workload(
        Batch(rows, longest[-1][0], max(r for _, r in longest)),
        sum(n for n, _ in lengths),
        len(examples),
        len(items),
        max(prompts, default=0),
        sum(prompts),
        new,
        choice,
        f"the task's items, tokenised with {tokenizer}'s tokenizer (a stand-in for the student's)"
        if tokenizer
        else "the task's items, tokenised with the student's tokenizer",
    )


def _formatter(recipe: Recipe, task: Any, tokenizer: str | None = None) -> Any:
    from transformers import AutoTokenizer

    from pktransfer.data.formatting import recipe_formatter
    from pktransfer.models.loading import resolve_source

    source = resolve_source(tokenizer or recipe.student.model)
    rev = None if tokenizer else recipe.student.revision
    try:  # a folder or the hub's cache: no waiting on an unreachable hub
        tok = AutoTokenizer.from_pretrained(source, revision=rev, local_files_only=True)
    except (OSError, ValueError):
        tok = AutoTokenizer.from_pretrained(source, revision=rev)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return recipe_formatter(tok, task, recipe.task, recipe.method.name)


# ---- the device's rates ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rates:
    flops: float  # sustained matmul FLOP/s in the models' dtype
    bandwidth: float  # bytes/s a decode step streams the weights at
    source: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


GPU_RATES = {  # dense bf16 peak FLOP/s and HBM bytes/s; the plan assumes 40% and 70% of them sustained
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
    "L40S": (362e12, 0.86e12),
    "A10": (125e12, 0.6e12),
}


def device_rates(device: torch.device, dtype: torch.dtype, gpu: str | None = None) -> Rates:
    if device.type == "cuda":
        name = gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else "H100")
        key = next((k for k in GPU_RATES if k.lower() in name.lower()), "H100")
        f, b = GPU_RATES[key]
        return Rates(0.4 * f, 0.7 * b, f"{key}: 40% of {f / 1e12:.0f} TFLOP/s, 70% of {b / 1e12:.2f} TB/s (a table)", device)
    a = torch.randn(1024, 1024, dtype=dtype)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    flops = 2 * 1024**3 * n / (time.perf_counter() - t0)
    big = torch.empty(64 * 2**20, dtype=torch.uint8)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.2:
        big.clone()
        n += 1
    bw = 2 * big.numel() * n / (time.perf_counter() - t0)
    return Rates(flops, bw, f"this CPU, measured now: {flops / 1e9:.0f} GFLOP/s ({dtype}), {bw / 1e9:.1f} GB/s copy")


# ---- stages -------------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    terms: dict[str, int]  # bytes, by what holds them
    seconds: float
    adaptive: bool = False  # an evaluation at batch_size auto: it lowers its batch until it fits

    @property
    def peak(self) -> int:
        return sum(self.terms.values())


@dataclass
class Plan:
    recipe: Recipe
    device: torch.device
    stages: list[Stage]
    rates: Rates
    workload: Workload
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.peak)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "rates": self.rates.source,
            "lengths": self.workload.source,
            "stages": {
                s.name: {
                    "peak_gib": round(s.peak / GIB, 2),
                    "seconds": round(s.seconds, 1),
                    "terms_gib": {k: round(v / GIB, 3) for k, v in s.terms.items()},
                }
                for s in self.stages
            },
            "peak_gib": round(self.peak.peak / GIB, 2),
            "seconds": round(sum(s.seconds for s in self.stages), 1),
            "notes": self.notes,
        }


LOAD_BYTES_PER_S = 1e9  # reading weights from a local disk, the plan's assumption


def make_plan(recipe: Recipe, device: str | None = None, gpu: str | None = None, tokenizer: str | None = None) -> Plan:
    """The plan of ``recipe`` on ``device`` (``cpu``/``cuda``; default: where the student's spec puts it)."""
    from pktransfer.methods import get_method
    from pktransfer.models.loading import resolve_device

    dev = torch.device(device) if device else resolve_device(recipe.student.device)
    method = get_method(recipe.method)
    wl = workload(recipe, tokenizer)
    notes: list[str] = []
    student = model_shape(recipe.student, "student", dev, notes)
    ev = recipe.evaluation
    teacher = model_shape(recipe.teacher, "teacher", dev, notes) if ev.teacher or method.needs_teacher else None
    rates = device_rates(dev, student.dtype, gpu)
    auto = not isinstance(ev.batch_size, int)
    rows = 16 if auto else ev.batch_size
    notes += [f"lengths: {wl.source}; longest training batch {wl.train.rows} x {wl.train.length} tokens, longest "
             f"evaluation prompt {wl.prompt} tokens + {wl.new_tokens} new"]  # fmt: skip
    if not isinstance(ev.batch_size, int):
        notes.append(
            "evaluation.batch_size auto: evaluations planned at 16 rows (~); auto lowers the batch until it fits, "
            "so they are not held against the device's memory"
        )
    stages: list[Stage] = []
    t_w = {"teacher weights": teacher.weight_bytes} if teacher else {}
    if teacher is not None and ev.teacher:
        stages.append(Stage("load_teacher", dict(t_w), teacher.weight_bytes / LOAD_BYTES_PER_S))
        stages.append(_eval_stage("eval_teacher", teacher, t_w, wl, rows, rates, auto))
    resident = t_w if method.needs_teacher else {}
    s_w = {**resident, "student weights": student.weight_bytes}
    stages.append(Stage("load_student", s_w, student.weight_bytes / LOAD_BYTES_PER_S))
    if ev.student:
        stages.append(_eval_stage("eval_student", student, s_w, wl, rows, rates, auto))
    stages += _prepare_stages(recipe, teacher, student, s_w, wl, rates, dev)
    trains = method.post_training and recipe.training.max_steps != 0
    if trains:
        stages.append(_train_stage(recipe, method, teacher, student, wl, rates, dev, notes))
    final = student
    if recipe.method.name == "laten" and ev.dtype == "as-is":  # scored in the float32 it worked in
        final = ModelShape("student", student.config, student.arch, torch.float32, student.n_params,
                           student.bytes_in(torch.float32))  # fmt: skip
    stages.append(_eval_stage("eval_trained", final, {"trained student weights": final.weight_bytes}, wl, rows, rates, auto))
    return Plan(recipe, dev, stages, rates, wl, notes)


def _eval_stage(
    name: str, m: ModelShape, resident: dict[str, int], wl: Workload, rows: int, rates: Rates, auto: bool = False
) -> Stage:
    stage = _eval_stage_at(name, m, resident, wl, rows, rates)
    stage.adaptive = auto
    return stage


def _eval_stage_at(name: str, m: ModelShape, resident: dict[str, int], wl: Workload, rows: int, rates: Rates) -> Stage:
    rows = max(1, min(rows, wl.eval_items))
    if wl.choice:  # log-likelihood scoring: one forward over prompt + choice, float32 logits at the choice tokens
        batch = Batch(rows, wl.prompt + 4, 4)
        work = forward_peak(m, batch, logits="response", device=rates.device)
        seconds = 2 * m.n_params * wl.prompt_tokens / rates.flops
        return Stage(name, {**resident, "scoring forward (traced)": work}, seconds)
    prefill = forward_peak(m, Batch(rows, wl.prompt, 1), logits="last", device=rates.device)
    grow = m.kv_bytes(rows, wl.new_tokens)
    steps = math.ceil(wl.eval_items / rows) * wl.new_tokens
    decode = steps * max(m.weight_bytes / rates.bandwidth, 2 * m.n_params * rows / rates.flops)
    seconds = 2 * m.n_params * wl.prompt_tokens / rates.flops + decode
    return Stage(name, {**resident, "prefill at the longest prompt (traced)": prefill, "KV cache of the new tokens": grow},
                 seconds)  # fmt: skip


def _train_stage(
    recipe: Recipe, method: Any, teacher: ModelShape | None, student: ModelShape, wl: Workload, rates: Rates,
    dev: torch.device, notes: list[str],
) -> Stage:  # fmt: skip
    """``notes`` hears how the method's LoRA was placed, where it is not ``recipe.lora`` on every layer."""
    from pktransfer.training import total_steps

    lora_recipe, layers, note = trained_lora(recipe, teacher, student)
    notes += [note] if note else []
    step, lora = train_step_peak(student, lora_recipe, wl.train, dev, layers)
    terms = {"student weights": student.weight_bytes, "LoRA weights": lora, "training step (traced)": step}
    if method.teacher_during_training and teacher is not None:
        terms["teacher weights"] = teacher.weight_bytes
        terms["teacher forward for its logits (traced)"] = forward_peak(teacher, wl.train, logits="response", device=dev)
    spec = recipe.training
    steps = total_steps(spec, wl.n_train) or math.ceil(spec.epochs * math.ceil(wl.n_train / spec.batch_size) / spec.grad_accum)
    tokens = steps * spec.batch_size * wl.train_tokens / max(wl.n_train, 1)
    flops = 4 * student.n_params * tokens  # frozen base: forward and the backward to the activations
    if method.teacher_during_training and teacher is not None:
        flops += 2 * teacher.n_params * tokens
    return Stage("train", terms, flops / rates.flops)


def seeking_working_sets(
    recipe: Recipe, teacher: ModelShape, student: ModelShape, seed: Batch, n_layers: int, dev: torch.device
) -> tuple[int, int]:
    """Seeking's two working sets beside its maps, in bytes: (the sensitivity pass, the extraction).

    The pass: the teacher's backward over one seed sample, and one weight's gradient at a time (a hook folds it into
    its map and frees it); untied vocabulary matrices are streamed from their input and output gradients (float32)
    instead. The extraction (CPU memory, after the pass): a student-shaped float32 matrix for each LoRA-targeted
    weight of the ``n_layers`` student layers (methods/seeking.py extract_matrices), the SVD of the largest (its copy
    and factors), and the submatrix search's float64 window sums over the widest teacher map (ops/selection.py)."""
    from pktransfer.methods.injection import group_roles, targeted_roles
    from pktransfer.training import resolved_lora

    spec, T, S = recipe.method, teacher.arch, student.arch
    t_layer = T.layer_weights(0)
    backward = forward_peak(teacher, seed, logits="all", backward=True, device=dev, checkpointing=spec.gradient_checkpointing)
    largest = max(math.prod(w.shape) for w in t_layer if len(w.shape) == 2)
    if T.tied_embeddings:
        largest = max(largest, T.vocab_size * T.hidden_size)
    streamed = 0 if T.tied_embeddings else 4 * seed.length * (T.vocab_size + T.hidden_size)
    sensitivity_pass = backward + largest * _size(teacher.dtype) + streamed
    targets = targeted_roles(resolved_lora(recipe.lora, S).target_modules) & group_roles(spec.modules)
    s_shapes = {w.role: w.shape for w in S.layer_weights(0) if w.role in targets and len(w.shape) == 2}
    s_shapes.update({w.role: w.shape for w in S.global_weights() if w.role in targets and w.role in ("embed", "lm_head")})
    per_role = {r: math.prod(shape) for r, shape in s_shapes.items()}
    matrices = 4 * sum(n * (1 if r in ("embed", "lm_head") else n_layers) for r, n in per_role.items())
    t_shapes = {w.role: w.shape for w in t_layer}
    window = max(
        (16 * (t_shapes[r][1] - s_shapes[r][1] + 1) * (t_shapes[r][0] + 1) for r in s_shapes if r in t_shapes), default=0
    )
    extraction = matrices + 3 * 4 * max(per_role.values(), default=0) + (window if spec.structure == "submatrix" else 0)
    return sensitivity_pass, extraction


def _prepare_stages(
    recipe: Recipe, teacher: ModelShape | None, student: ModelShape, resident: dict[str, int], wl: Workload,
    rates: Rates, dev: torch.device,
) -> list[Stage]:  # fmt: skip
    """The method's own step before training, with what its spec says it holds."""
    spec = recipe.method
    name = spec.name
    if name == "compose":
        return _prepare_stages(recipe.model_copy(update={"method": spec.start}), teacher, student, resident, wl, rates, dev)
    if teacher is None or name in ("lora", "pissa", "gkd"):
        return []
    seed = Batch(1, wl.train.length, wl.train.response)
    seed_tokens = wl.train_tokens / max(wl.n_train, 1)
    T, S = teacher.arch, student.arch
    if name == "seeking":
        from pktransfer.methods.injection import group_roles

        m = 4 if spec.map_dtype == "float32" else 2
        roles = group_roles(spec.modules)
        layers = T.n_layers if spec.maps == "all_layers" else min(S.n_layers, T.n_layers)
        held = dict(resident)
        if dev.type == "cuda":  # the student waits in CPU memory during the pass (ops.offload.parked)
            held.pop("student weights", None)
        # per-element maps of the layer weights whose roles can be chosen (a fused weight's whole map); the
        # embeddings and every other weight keep sums only (methods/seeking.py accumulator_modes)
        t_layer = T.layer_weights(0)
        mapped = {w.module for w in t_layer if w.role in roles}
        per_layer = sum(math.prod(w.shape) for w in t_layer if w.module in mapped) if spec.structure == "submatrix" else 0
        terms = {**held, "sensitivity maps": m * layers * per_layer}
        sensitivity_pass, extraction = seeking_working_sets(recipe, teacher, student, seed, min(S.n_layers, T.n_layers), dev)
        if dev.type == "cuda" or sensitivity_pass >= extraction:  # on a GPU the extraction runs in CPU memory
            terms["teacher backward (traced) and one weight's gradient"] = sensitivity_pass
        else:
            terms["extraction: student-shaped float32 matrices, an SVD, the window sums"] = extraction
        passes = 2 if spec.layers == "sensitivity" and spec.maps == "selected_layers" else 1
        return [Stage("prepare", terms, passes * 6 * teacher.n_params * spec.n_seed * seed_tokens / rates.flops)]
    if name == "laten":
        d_t, d_s, L = T.hidden_size, S.hidden_size, wl.train.length
        hyper = 4 * (d_t * d_t + d_t * d_s)  # one hypernetwork per role (up, down, v, o), float32
        terms = {
            "teacher weights": teacher.weight_bytes,
            "student weights (float32)": student.bytes_in(torch.float32),
            "hypernetworks, gradients, AdamW moments": 16 * hyper,
            # each item of an update is its own micro-batch (methods/laten.py _train); validation forwards 8 at a time
            "student backward of one item, or a validation forward of 8 (traced)": max(
                forward_peak(student, Batch(1, L, L), logits="all", dtype=torch.float32, backward=True, device=dev),
                forward_peak(student, Batch(8, L, L), logits="all", dtype=torch.float32, device=dev),
            ),
        }
        steps = getattr(spec, "total_steps", None) or spec.n_extract
        flops = 6 * teacher.n_params * spec.n_extract * seed_tokens + steps * 16 * 6 * student.n_params * seed_tokens
        return [Stage("prepare", terms, flops / (rates.flops / 4))]  # float32: about a quarter of the bf16 rate
    if name == "semalign":
        d_t, d_s, chunk = T.hidden_size, S.hidden_size, spec.basis_chunk
        # (WᵀW)⁺ of both heads and the map in float32; while one is made: a chunk of head rows, its Gram and the pinv's
        # workspace in float64 (ops/semantic.py reads the heads chunk by chunk, never a whole basis)
        maps = 4 * (d_t**2 + d_s**2 + d_s * d_t) + 8 * (chunk * max(d_t, d_s) + 4 * max(d_t, d_s) ** 2)
        # 1. layer attribution: forward and backward over the seed items (batches of min(batch, n_seed)), every layer's
        # output kept with its graph; the model's logits at every position in its dtype and their gradient, the
        # cross entropy upcast at response positions only; 4. the targets: forward passes at the training batch (one
        # after the other, so the larger one)
        rows = min(spec.attribution_batch_size or wl.train.rows, spec.n_seed)
        seed_batch = Batch(rows, wl.train.length, wl.train.response)
        full_logits = 2 * seed_batch.rows * seed_batch.length * T.vocab_size * _size(teacher.dtype)
        attribution = forward_peak(teacher, seed_batch, logits="response", backward=True, device=dev) + full_logits
        targets = forward_peak(teacher, wl.train, logits="response", device=dev)
        terms = {
            **resident,
            "semantic maps (float32) and one chunk of a head (float64)": maps,
            "teacher backward for layer attribution, or forward for targets (traced)": max(attribution, targets),
        }
        flops = 6 * teacher.n_params * spec.n_seed * seed_tokens + 2 * teacher.n_params * wl.train_tokens
        return [Stage("prepare", terms, flops / rates.flops)]
    if name in ("kd", "hidden_kd") and getattr(spec, "cache", False):
        terms = {
            **resident,
            "teacher forward for the logits cache (traced)": forward_peak(teacher, wl.train, logits="response", device=dev),
        }
        return [Stage("prepare", terms, 2 * teacher.n_params * wl.train_tokens / rates.flops)]
    if name == "delta" and not (spec.teacher_adapter or spec.teacher_model):
        step, lora = train_step_peak(teacher, recipe, wl.train, dev)
        terms = {**resident, "teacher LoRA": lora, "teacher training step (traced)": step}
        return [Stage("prepare", terms, 4 * teacher.n_params * wl.train_tokens / rates.flops)]
    return [Stage("prepare", dict(resident), 2 * teacher.n_params * seed_tokens * 32 / rates.flops)]


def render_plan(plan: Plan) -> Any:
    from rich.table import Table

    r = plan.recipe
    table = Table(title=f"pkt plan: {r.method.name} on {r.task.name}, {plan.device.type} ({plan.rates.source})")
    for col, just in (("stage", "left"), ("peak GiB", "right"), ("time", "right"), ("what it holds (GiB)", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for s in plan.stages:
        terms = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(s.terms.items(), key=lambda kv: -kv[1]))
        mark = (" *" if s is plan.peak else "") + (" ~" if s.adaptive else "")
        table.add_row(s.name + mark, f"{s.peak / GIB:.2f}", _duration(s.seconds), terms)
    total = sum(s.seconds for s in plan.stages)
    table.caption = f"* the peak: {plan.peak.name}, {plan.peak.peak / GIB:.1f} GiB; about {_duration(total)} in all"
    return table


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def check_fits(plan: Plan, free_bytes: int) -> None:
    """Refuse a run whose planned peak does not fit the device's free memory, naming the stage and the shortfall."""
    fixed = [s for s in plan.stages if not s.adaptive]
    if not fixed:
        return
    worst = max(fixed, key=lambda s: s.peak)
    if worst.peak > free_bytes:
        short = (worst.peak - free_bytes) / GIB
        raise RecipeError(
            f"the plan's peak ({worst.name}: {worst.peak / GIB:.1f} GiB) exceeds the {free_bytes / GIB:.1f} GiB free on "
            f"{plan.device} by {short:.1f} GiB",
            hint="see `pkt plan RECIPE` for what each stage holds: shard the teacher (teacher.device_map), lower the "
            "batch or max_length, turn on training.gradient_checkpointing, or set PKT_SKIP_PLAN_CHECK=1 to run anyway",
        )


def check_recipe_fits(recipe: Recipe) -> None:
    """Before a CUDA run: its plan against the GPU's free memory (skipped on CPU, with a sharded teacher, or with
    ``PKT_SKIP_PLAN_CHECK=1``)."""
    import os

    from pktransfer.models.loading import resolve_device

    if os.environ.get("PKT_SKIP_PLAN_CHECK") == "1" or recipe.teacher.device_map is not None:
        return
    dev = resolve_device(recipe.student.device)
    if dev.type != "cuda":
        return
    free, _total = torch.cuda.mem_get_info(dev)
    check_fits(make_plan(recipe, "cuda"), free)


GPU_80GB = 80e9  # an "80 GB" GPU: 74.5 GiB


def header_lines(plan: Plan, device_bytes: float = GPU_80GB) -> list[str]:
    """The plan as a recipe header's ``# Needs`` comment (recipes/papers/ carry it; tests/test_paper_recipes.py
    checks that each header agrees with the plan)."""
    fixed = [s for s in plan.stages if not s.adaptive]
    worst = max(fixed, key=lambda s: s.peak)
    top = sorted(worst.terms.items(), key=lambda kv: -kv[1])[:3]
    by = {s.name: s for s in plan.stages}
    evals = "/".join(f"{by[n].peak / GIB:.1f}" for n in ("eval_teacher", "eval_student", "eval_trained") if n in by)
    train = f"training {by['train'].peak / GIB:.1f} GiB; " if "train" in by else ""
    gib = device_bytes / GIB
    over = worst.peak / GIB - gib
    fits = f"one 80 GB GPU ({gib:.1f} GiB)" if over <= 0 else f"over one 80 GB GPU ({gib:.1f} GiB) by {over:.1f} GiB"
    text = (
        f"Needs (`pkt plan --device cuda --gpu H100`; docs/results.md): peak {worst.peak / GIB:.1f} GiB in {worst.name} "
        f"({', '.join(f'{k} {v / GIB:.1f}' for k, v in top)}); {train}evaluations {evals} GiB at 16 rows "
        f"(batch_size auto lowers them): {fits}. About {_duration(sum(s.seconds for s in plan.stages))} on one "
        f"{plan.rates.source.split(':')[0]} (an order of magnitude). Lengths: {plan.workload.source}."
    )
    import textwrap

    return ["# " + line for line in textwrap.wrap(text, 116)]
