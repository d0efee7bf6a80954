"""Teacher-delta transport (Theseus, arXiv 2602.12952): a fine-tuned teacher's update, moved into the student.

Seeking, LaTen and SemAlign move what the teacher's *base* weights or activations hold. This start moves what a
*fine-tuning* added to the teacher, training-free, across widths:

1. The teacher's update τ_T per linear weight: from ``teacher_adapter`` (a PEFT adapter on the untouched teacher,
   e.g. the one ``pkt plant`` keeps; peft's own ``get_delta_weight``), from ``teacher_model`` (a fine-tuned teacher:
   τ_T = fine-tuned − untouched), or, with neither, from a LoRA this method trains on the teacher over the task's
   train split (``teacher_training``; counted as teacher cost).
2. Activations: the method's seed items (the task's ``seed`` split, training side only) run through the untouched
   teacher and the student; for every paired layer and weight, each module's input and output rows.
3. Layer pairing (the paper pairs equal depths; this pair has 28 and 24 layers): ``uniform``, the project's depth map
   (``ops.distill.uniform_layer_pairs``: student layer i takes teacher layer ⌊(i+1)·L_T/L_S⌋ − 1; the other teacher
   layers' updates are dropped, and their share of the update's energy is reported), or ``sum``: every teacher layer
   goes to the student layer at its relative depth and the transported updates of a student layer are summed.
4. Transport: T_in, T_out by orthogonal Procrustes on those rows, τ_S = T_outᵀ·τ_T·T_in (``ops.procrustes``), scaled
   by ``alpha`` (the official code's task-vector coefficient; 1: the update as transported).
5. Start: the student's LoRA begins at the rank-r SVD of α·τ_S (B0·A0 with s·B0·A0 the truncation) and the base keeps
   what the truncation leaves (W_S + α·τ_S − s·B0·A0), so the student at step 0 *is* the transported model. The
   energy the truncation moves into the base is reported per weight; a teacher adapter of rank <= r loses none
   (τ_S has the rank of τ_T), and then the saved adapter applies to the unmodified student; otherwise the base's
   residual is saved beside it (``delta_residual.safetensors``) and so is the merged student.

``training.max_steps: 0`` evaluates the transported student as it is (training-free, as the paper); as a start in
``compose`` (``delta + kd``, ``delta + gkd``) it is trained toward the objective from there.

Steps 1-4 do not depend on the run's seed when the update is given (``teacher_adapter`` / ``teacher_model``):
``pkt transport RECIPE`` does them once and writes ``transport/`` (the transported updates and what was measured),
which ``method.transport`` reuses; a comparison grid does this for its delta cells by itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from pktransfer.config import MethodConfig, ModelSpec, Strict, hash_view
from pktransfer.data import encode_items, recipe_formatter
from pktransfer.data.batching import pad
from pktransfer.errors import IncompatiblePairError, RecipeError
from pktransfer.fileio import save_safetensors, write_json
from pktransfer.methods.base import Method, MethodContext, SharedWork, Verb, needs_seed_split
from pktransfer.methods.injection import check_ranks, stack_roles, targeted_roles
from pktransfer.models.arch import ATTENTION_ROLES, FFN_ROLES, ArchitectureDescription
from pktransfer.models.loading import adapter_sha256
from pktransfer.models.pair import check_pair
from pktransfer.ops.distill import uniform_layer_pairs
from pktransfer.ops.offload import input_device
from pktransfer.ops.procrustes import procrustes_with_rank, transport
from pktransfer.training import check_targets, resolved_lora

ROLES = (*ATTENTION_ROLES, *FFN_ROLES)
RESIDUAL_FILE = "delta_residual.safetensors"
TRANSPORT_FILE, TRANSPORT_INFO = "updates.safetensors", "transport.json"  # what `pkt transport` writes
LOSSLESS = 1e-6  # a truncation losing less than this share of an update's energy is float rounding, not rank


class TeacherTraining(Strict):
    """The LoRA trained on the teacher when no fine-tuned teacher is given (its cost is counted as teacher cost)."""

    epochs: float = Field(default=1.0, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    batch_size: int = Field(default=8, ge=1)


class DeltaConfig(MethodConfig):
    """Theseus: a fine-tuned teacher's update transported into the student by Procrustes maps on activations."""

    name: Literal["delta"] = "delta"
    teacher_adapter: str | None = Field(
        default=None, description="a PEFT adapter folder on the untouched teacher (its delta), e.g. a planted teacher's"
    )
    teacher_model: str | None = Field(
        default=None, description="a fine-tuned teacher (folder, hub id or builtin:NAME): delta = it − the untouched teacher"
    )
    teacher_base: str | None = Field(
        default=None,
        description="the untouched teacher the delta is taken against and activations are read from (default: the "
        "recipe's teacher; set it when the recipe's teacher is the fine-tuned one, as in the planted study)",
    )
    alpha: float = Field(default=1.0, gt=0, description="scale of the transported update (the task-vector coefficient)")
    n_items: int | None = Field(default=None, ge=1, description="seed items for the activations (None: the whole seed split)")
    layer_pairing: Literal["uniform", "sum"] = Field(
        default="uniform",
        description="uniform: student layer i takes teacher layer floor((i+1)·L_T/L_S) − 1 (the rest are dropped); "
        "sum: every teacher layer goes to the student layer at its relative depth, updates summed",
    )
    mlp_space: Literal["shared", "per_module"] = Field(
        default="shared",
        description="shared (our reading): one map for the MLP's neuron space, from down_proj's inputs, for gate's and "
        "up's outputs and down's inputs; per_module: a map per module as theseus.py (gate's and up's outputs are linear "
        "images of the hidden state, so at most hidden-size of the MLP width is ever determined by them)",
    )
    center: bool = Field(default=False, description="centre activations before Procrustes (official center_acts; off)")
    whiten_power: float = Field(default=0.0, ge=0, le=0.5, description="partial whitening (official whiten_power; 0)")
    batch_size: int = Field(default=8, ge=1, description="items per forward pass while collecting activations")
    layers_per_pass: int = Field(
        default=6, ge=1, description="student layers whose activations are held at once (memory against forward passes)"
    )
    teacher_training: TeacherTraining = Field(default_factory=TeacherTraining)
    transport: str | None = Field(
        default=None,
        description="a `transport/` folder written by `pkt transport` (steps 1-4 done once: the transported updates, "
        "before alpha); a comparison grid shares one across every delta cell that would compute the same",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DeltaConfig:
        if self.teacher_adapter is not None and self.teacher_model is not None:
            raise ValueError("give teacher_adapter or teacher_model, not both (the delta comes from one of them)")
        return self


# ---- 1. the teacher's update -----------------------------------------------------------------------


def layer_roles(arch: ArchitectureDescription) -> list[tuple[int, str]]:
    return [(layer, role) for layer in range(arch.n_layers) for role in ROLES if role in arch.spec.projections]


def adapter_deltas(model: Any, arch: ArchitectureDescription, adapter: str) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, role) -> the adapter's dense update (peft's ``get_delta_weight``: scaling, rank pattern and rsLoRA as
    peft applies them), float32 on the CPU; the model is returned unwrapped (its modules as before)."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise RecipeError(
            f"method.teacher_adapter '{adapter}' has no adapter_config.json",
            hint="point it at a PEFT adapter folder (e.g. a planted teacher's adapter/)",
        )
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        raise IncompatiblePairError(
            f"method.teacher_adapter '{adapter}' does not fit the untouched teacher: {str(err).splitlines()[0][:200]}",
            hint="use the adapter trained on this teacher, or set method.teacher_base to the model it was trained on",
        ) from None
    try:
        return peft_deltas(peft_model, arch)
    finally:
        peft_model.unload()


@torch.no_grad()
def peft_deltas(peft_model: Any, arch: ArchitectureDescription) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, role) -> the dense update of every LoRA-wrapped projection of a PEFT model (peft's
    ``get_delta_weight``), its role's rows of a fused module, float32 on the CPU."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    inner = peft_model.base_model.model
    for layer, role in layer_roles(arch):
        module = inner.get_submodule(arch.module_name(layer, role))
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            out[(layer, role)] = module.get_delta_weight("default").detach().float().cpu()[arch.role_rows(role)]
    return out


def model_deltas(base: Any, tuned: Any) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, role) -> fine-tuned − untouched weight (float32, CPU) for every projection of the two models."""
    if base.arch.to_dict() | {"n_parameters": 0} != tuned.arch.to_dict() | {"n_parameters": 0}:
        raise IncompatiblePairError(
            f"method.teacher_model '{tuned.name}' is not a fine-tuned copy of the teacher '{base.name}' (architectures differ)",
            hint="teacher_model must be the teacher after fine-tuning (same shapes); set method.teacher_base otherwise",
        )
    out = {}
    for layer, role in layer_roles(base.arch):
        t = tuned.arch.role_weight(tuned.model, layer, role).float().cpu()
        out[(layer, role)] = t - base.arch.role_weight(base.model, layer, role).float().cpu()
    return out


# ---- 2-4. activations, pairing and transport ---------------------------------------------------------


def paired_layers(n_student: int, n_teacher: int, rule: str) -> dict[int, list[int]]:
    """Student layer -> the teacher layers whose updates it receives."""
    if rule == "uniform":
        return {i: [j] for i, j in uniform_layer_pairs(n_student, n_teacher)}
    out: dict[int, list[int]] = {i: [] for i in range(n_student)}
    for j in range(n_teacher):
        out[j * n_student // n_teacher].append(j)
    return out


class _Recorder:
    """Forward hooks that keep each watched projection's input and output rows (real tokens only), float32."""

    def __init__(self, model: Any, arch: ArchitectureDescription, wanted: list[tuple[int, str]]) -> None:
        self.rows: dict[tuple[int, str], dict[str, list[torch.Tensor]]] = {k: {"in": [], "out": []} for k in wanted}
        self.keep: torch.Tensor | None = None  # [B, L] bool of the current batch
        self.handles = []
        for layer, role in wanted:
            module = model.get_submodule(arch.module_name(layer, role))
            self.handles.append(module.register_forward_hook(self._hook((layer, role), arch.role_rows(role))))

    def _hook(self, key: tuple[int, str], rows: slice) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            self.rows[key]["in"].append(x[self.keep].detach().float().cpu())
            self.rows[key]["out"].append(output[..., rows][self.keep].detach().float().cpu())

        return hook

    def remove(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        for h in self.handles:
            h.remove()
        return {k: (torch.cat(v["in"]), torch.cat(v["out"])) for k, v in self.rows.items()}


@torch.no_grad()
def collect(
    model: Any, arch: ArchitectureDescription, wanted: list[tuple[int, str]], inputs: list[list[int]], pad_id: int, batch: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Input and output activation rows of the ``wanted`` (layer, role) projections over ``inputs`` (token ids)."""
    rec = _Recorder(model, arch, wanted)
    device = input_device(model)
    try:
        for start in range(0, len(inputs), batch):
            ids, mask = pad(inputs[start : start + batch], pad_id)
            rec.keep = mask.bool()
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        out = rec.remove()
    return out


def transport_all(
    teacher: Any,
    student: Any,
    deltas: dict[tuple[int, str], torch.Tensor],
    inputs: list[list[int]],
    spec: DeltaConfig,
    pad_id: int,
    log: Any = None,
) -> tuple[dict[tuple[int, str], torch.Tensor], dict[str, Any]]:
    """(student layer, role) -> the summed transported update, and what was measured along the way.

    Every map is a Procrustes map between the paired modules' activations (theseus.py: per module, input and
    output), except the MLP's neuron space with ``mlp_space: shared``: gate's and up's outputs and down's inputs are
    one coordinate space, mapped once from down's inputs (see :class:`DeltaConfig`)."""
    t_arch, s_arch = teacher.arch, student.arch
    pairs = paired_layers(s_arch.n_layers, t_arch.n_layers, spec.layer_pairing)
    roles = sorted({role for _, role in deltas}, key=ROLES.index)
    shared_mlp = spec.mlp_space == "shared" and any(r in roles for r in ("gate", "up", "down"))
    watched = sorted(set(roles) | ({"down"} if shared_mlp else set()), key=ROLES.index)
    kw = {"center": spec.center, "whiten_power": spec.whiten_power}
    moved: dict[tuple[int, str], torch.Tensor] = {}
    energy_total = sum(float(d.double().pow(2).sum()) for d in deltas.values())
    energy_used, n_rows, partial, maps = 0.0, 0, 0, 0
    student_layers = list(range(s_arch.n_layers))
    for first in range(0, len(student_layers), spec.layers_per_pass):
        chunk = student_layers[first : first + spec.layers_per_pass]
        t_layers = sorted({j for i in chunk for j in pairs[i]})
        t_rows = collect(teacher.model, t_arch, [(j, r) for j in t_layers for r in watched], inputs, pad_id, spec.batch_size)
        s_rows = collect(student.model, s_arch, [(i, r) for i in chunk for r in watched], inputs, pad_id, spec.batch_size)
        for i in chunk:
            for j in pairs[i]:
                fitted: dict[str, tuple[torch.Tensor, int]] = {}  # this layer pair's maps, each fitted once
                t_acts = {r: t_rows[(j, r)] for r in watched}
                s_acts = {r: s_rows[(i, r)] for r in watched}
                for role in roles:
                    if (j, role) not in deltas:
                        continue
                    n_rows = t_rows[(j, role)][0].shape[0]
                    mlp = ("mlp", "down", 0)
                    t_in = _fit(fitted, *(mlp if shared_mlp and role == "down" else (f"{role}.in", role, 0)), t_acts, s_acts, kw)
                    t_out = _fit(
                        fitted, *(mlp if shared_mlp and role in ("gate", "up") else (f"{role}.out", role, 1)), t_acts, s_acts, kw
                    )
                    tau = transport(deltas[(j, role)], t_in, t_out)
                    moved[(i, role)] = moved[(i, role)] + tau if (i, role) in moved else tau
                    energy_used += float(deltas[(j, role)].double().pow(2).sum())
                maps += len(fitted)
                partial += sum(int(k < min(t.shape)) for t, k in fitted.values())
        del t_rows, s_rows
        if log:
            log(f"delta: transported student layers {chunk[0]}..{chunk[-1]} from teacher layers {t_layers}")
    dropped = sorted(set(range(t_arch.n_layers)) - {j for js in pairs.values() for j in js})
    return moved, {
        "layer_pairs": {str(i): js for i, js in pairs.items()},
        "teacher_layers_dropped": dropped,
        "teacher_energy_dropped": 1 - energy_used / energy_total if energy_total > 0 else 0.0,
        "activation_rows": n_rows,
        "maps": maps,
        "maps_on_partial_span": partial,
        "roles": roles,
    }


def _fit(
    fitted: dict[str, tuple[torch.Tensor, int]],
    name: str,
    module: str,
    side: int,
    t_acts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    s_acts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    kw: dict[str, Any],
) -> torch.Tensor:
    """The map ``name`` (from ``module``'s inputs, side 0, or outputs, side 1), fitted once per layer pair."""
    if name not in fitted:
        fitted[name] = procrustes_with_rank(t_acts[module][side], s_acts[module][side], **kw)
    return fitted[name][0]


# ---- 5. the start ------------------------------------------------------------------------------------


@torch.no_grad()
def start_at_update(peft_model: Any, updates: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, dict[str, Any]]:
    """Start each LoRA at the rank-r truncation of its module's update U (s·B0·A0) and add what the truncation leaves
    (U − s·B0·A0) to the base weight, so the model computes W + U exactly. Returns per module the rank and the share
    of U's energy the truncation left in the base."""
    from pktransfer.ops.lowrank import svd_init

    modules = dict(peft_model.base_model.model.named_modules())
    out = {}
    for name, update in updates.items():
        layer = modules[name]
        s = layer.scaling[adapter]
        r = layer.lora_A[adapter].weight.shape[0]
        b, a = svd_init(update / s, r)
        base = layer.get_base_layer().weight
        layer.lora_A[adapter].weight.copy_(a.to(base.device))
        layer.lora_B[adapter].weight.copy_(b.to(base.device))
        residual = update - s * (b @ a)
        base.add_(residual.to(base.device, base.dtype))
        total = float(update.double().pow(2).sum())
        out[name] = {"rank": r, "energy_in_base": float(residual.double().pow(2).sum()) / total if total > 0 else 0.0}
    return out


class DeltaMethod(Method):
    config_class = DeltaConfig
    needs_teacher = True
    teacher_use = "weights"
    is_start = True

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.info: dict[str, Any] = {}
        self.residual: dict[str, torch.Tensor] = {}

    def _untouched_teacher(self, ctx: MethodContext) -> tuple[Any, bool]:
        """The untouched teacher (and whether this method loaded it itself, so it must release it)."""
        if self.spec.teacher_base is None:
            return ctx.load_teacher(), False
        from pktransfer.models import load_model

        spec = ModelSpec(model=self.spec.teacher_base, dtype=ctx.recipe.teacher.dtype, device=ctx.recipe.teacher.device)
        return load_model(spec, log=ctx.progress.log), True

    def _teacher_deltas(self, ctx: MethodContext, teacher: Any) -> tuple[dict[tuple[int, str], torch.Tensor], str]:
        spec = self.spec
        if spec.teacher_adapter is not None:
            return adapter_deltas(teacher.model, teacher.arch, spec.teacher_adapter), f"adapter {spec.teacher_adapter}"
        if spec.teacher_model is not None:
            from pktransfer.models import load_model

            tuned = load_model(ModelSpec(model=spec.teacher_model, device="cpu", dtype=ctx.recipe.teacher.dtype))
            try:
                return model_deltas(teacher, tuned), f"model {spec.teacher_model}"
            finally:
                tuned.unload()
        return self._train_teacher(ctx, teacher), "a LoRA trained here on the task's train split"

    def _train_teacher(self, ctx: MethodContext, teacher: Any) -> dict[tuple[int, str], torch.Tensor]:
        """Fine-tune the teacher with a LoRA on the train split (its forward and backward tokens count as teacher cost)."""
        from peft import get_peft_model

        from pktransfer.config import LoraSpec, TrainingSpec
        from pktransfer.training import lora_config, train

        tt = self.spec.teacher_training
        formatter = recipe_formatter(teacher.tokenizer, ctx.task, ctx.recipe.task, self.name)
        items = ctx.task.split("train")[: ctx.recipe.task.n_train] if ctx.recipe.task.n_train else ctx.task.split("train")
        examples = encode_items(formatter, items, ctx.recipe.training.max_length, "delta: teacher training items")
        lora = LoraSpec(r=tt.r, alpha=tt.alpha, dropout=0.0, target_modules=list(ctx.recipe.lora.target_modules))
        training = TrainingSpec(epochs=tt.epochs, lr=tt.lr, batch_size=tt.batch_size, max_length=ctx.recipe.training.max_length)
        model = get_peft_model(teacher.model, lora_config(lora, teacher.arch))
        t0 = time.perf_counter()
        result = train(
            model, teacher.tokenizer, examples, training, output_dir=ctx.workdir / "teacher_delta", seed=ctx.recipe.seed
        )
        ctx.teacher_work.add(
            "delta: teacher fine-tuning",
            forward_tokens=result.tokens_seen,
            backward_tokens=result.tokens_seen,
            seconds=time.perf_counter() - t0,
            parameters=teacher.arch.n_parameters,
        )
        out = peft_deltas(model, teacher.arch)
        model.unload()
        return out

    def transported(self, ctx: MethodContext) -> tuple[dict[tuple[int, str], torch.Tensor], dict[str, Any]]:
        """Steps 1-4: (student layer, role) -> the transported update (before ``alpha``), and what was measured."""
        spec, recipe, student = self.spec, ctx.recipe, ctx.student
        teacher, own = self._untouched_teacher(ctx)
        try:
            check_pair(teacher.arch, student.arch, teacher.tokenizer, student.tokenizer, self.name)
            fused = [r for r in ROLES if student.arch.role_rows(r) != slice(None) and r in student.arch.spec.projections]
            t0 = time.perf_counter()
            deltas, source = self._teacher_deltas(ctx, teacher)
            if not deltas:
                raise RecipeError(
                    f"delta: the teacher's update ({source}) changes no projection weight", hint="check the adapter"
                )
            roles = targeted_roles(resolved_lora(recipe.lora, student.arch).target_modules)
            deltas = {k: v for k, v in deltas.items() if k[1] in roles}
            items = ctx.task.split("seed")[: spec.n_items] if spec.n_items else ctx.task.split("seed")
            inputs = [e.input_ids for e in encode_items(ctx.formatter, items, recipe.training.max_length, "delta: seed items")]
            pad_id = student.tokenizer.pad_token_id if student.tokenizer.pad_token_id is not None else 0
            moved, info = transport_all(teacher, student, deltas, inputs, spec, pad_id, ctx.progress.log)
            ctx.teacher_work.add(
                "delta: activations for the Procrustes maps",
                forward_tokens=n_tokens_of(inputs) * -(-student.arch.n_layers // spec.layers_per_pass),
                seconds=time.perf_counter() - t0,
                parameters=teacher.arch.n_parameters,
            )
        finally:
            if own:
                teacher.unload()
        return moved, {"source": source, "fused_roles": fused, **info, "items": len(inputs)}

    def prepare(self, ctx: MethodContext) -> Any:
        from peft import get_peft_model

        from pktransfer.models.tying import untie_if_targeted
        from pktransfer.training import lora_config

        spec, recipe, student = self.spec, ctx.recipe, ctx.student
        check_targets(student.model, recipe.lora, student.arch, ctx.progress.warn)
        check_ranks(student.arch, recipe)
        if spec.transport is not None:
            moved, info = load_transport(Path(spec.transport), ctx)
            ctx.progress.log(f"delta: the transported updates from {spec.transport} (steps 1-4 done once, shared)")
        else:
            moved, info = self.transported(ctx)
        updates = stack_roles(
            [(student.arch.module_name(i, role), spec.alpha * tau) for (i, role), tau in sorted(moved.items(), key=_order)]
        )
        untie_if_targeted(student, recipe.lora.target_modules, ctx.progress.log)
        model = get_peft_model(student.model, lora_config(recipe.lora, student.arch, init=True))
        kept = start_at_update(model, updates)
        self.residual = {
            name: (upd - _lora_update(model, name)).contiguous()
            for name, upd in updates.items()
            if kept[name]["energy_in_base"] > LOSSLESS
        }
        total = sum(float(u.double().pow(2).sum()) for u in updates.values())
        self.info = {
            "alpha": spec.alpha,
            **info,
            "modules": len(updates),
            "rank": resolved_lora(recipe.lora, student.arch).r,
            "energy_in_base": sum(kept[n]["energy_in_base"] * float(updates[n].double().pow(2).sum()) for n in kept) / total
            if total > 0
            else 0.0,
            "max_module_energy_in_base": max((k["energy_in_base"] for k in kept.values()), default=0.0),
            "update_norm": total**0.5,
            "residual_saved": bool(self.residual),
        }
        write_json(ctx.workdir / "delta.json", {**self.info, "per_module": kept})
        ctx.progress.log(
            f"delta: {len(updates)} weights from {info['source']}; rank-{self.info['rank']} truncation leaves "
            f"{100 * self.info['energy_in_base']:.2f}% of the update's energy in the base; "
            f"teacher layers dropped {info['teacher_layers_dropped']} ({100 * info['teacher_energy_dropped']:.1f}% of its energy)"
        )
        return model

    def report(self) -> dict[str, Any]:
        return dict(self.info)

    @classmethod
    def shared_work(cls, recipe: Any, shared_root: Path) -> SharedWork:
        """Steps 1-4 depend on the pair, the update's source, the seed items and the targeted roles, not on the seed
        (unless the teacher's delta is trained here): one ``pkt transport`` serves every cell that needs the same."""
        m = recipe.method
        if m.transport is not None:
            return SharedWork(recipe)
        given = m.teacher_adapter is not None or m.teacher_model is not None
        what = {
            "teacher": recipe.teacher.identity(),
            "student": recipe.student.identity(),
            "task": hash_view("task", recipe.task.model_dump()),
            "max_length": recipe.training.max_length,
            "targets": recipe.lora.target_modules,
            "method": m.model_dump(exclude={"transport", "alpha"}),
            "adapter_sha256": adapter_sha256(m.teacher_adapter),
            "seed": None if given else recipe.seed,
            "training": None if given else hash_view("training", recipe.training.model_dump()),
        }
        return SharedWork.once(recipe, shared_root, "delta", what, "transport", "transport")

    @classmethod
    def verbs(cls) -> dict[str, Verb]:
        return {
            "transport": Verb(
                "Teacher-delta steps 1-4 without training: the teacher's update transported into the student's "
                "shapes. Writes transport/; reuse it with method.transport.",
                _transport,
                needs_seed_split,
            )
        }

    def single_process_only(self) -> tuple[str, str] | None:
        if self.spec.teacher_adapter is None and self.spec.teacher_model is None and self.spec.transport is None:
            return (
                "it would train the teacher's delta inside every process's preparation",
                "train the teacher's delta first in one process (e.g. `pkt plant`, or a LoRA run with the teacher as "
                "student) and pass it as method.teacher_adapter",
            )
        return None

    def saves_merged(self) -> bool:
        return bool(self.residual)

    def save_adapter(self, model: Any, folder: Path) -> None:
        """The trained LoRA (which holds the transported update) as a plain adapter; where the truncation left part of
        the update in the base, that residual is saved beside it (``delta_residual.safetensors``: base module name ->
        the dense update to add), and the run also writes the merged student."""
        model.save_pretrained(str(folder))
        if self.residual:
            save_safetensors({f"{k}.weight": v.cpu() for k, v in self.residual.items()}, folder.parent / RESIDUAL_FILE)


def n_tokens_of(inputs: list[list[int]]) -> int:
    return sum(len(x) for x in inputs)


def _order(item: tuple[tuple[int, str], torch.Tensor]) -> tuple[int, int]:
    (layer, role), _ = item
    return layer, ROLES.index(role)


def _lora_update(model: Any, name: str, adapter: str = "default") -> torch.Tensor:
    layer = model.base_model.model.get_submodule(name)
    return (layer.scaling[adapter] * (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight)).float().cpu()


def _transport(method: DeltaMethod, ctx: MethodContext, log: Any) -> dict[str, Any]:
    """Steps 1-4 only: writes ``transport/`` (``updates.safetensors``: "LAYER.ROLE" -> the transported update,
    float32, before alpha; ``transport.json``: what was measured and the student it was made for)."""
    with log.stage("transport"):
        moved, info = method.transported(ctx)
    folder = ctx.workdir / "transport"
    save_safetensors({f"{layer}.{role}": t.contiguous() for (layer, role), t in moved.items()}, folder / TRANSPORT_FILE)
    write_json(folder / TRANSPORT_INFO, {"student": ctx.recipe.student.identity(), "info": info})
    return {"modules": len(moved), "outputs": {"transport": "transport"}}


def load_transport(folder: Path, ctx: MethodContext) -> tuple[dict[tuple[int, str], torch.Tensor], dict[str, Any]]:
    """``pkt transport``'s output, checked against this run's student (its identity and every update's shape)."""
    student = ctx.student
    if not (folder / TRANSPORT_FILE).is_file() or not (folder / TRANSPORT_INFO).is_file():
        raise RecipeError(
            f"method.transport '{folder}' holds no transported updates ({TRANSPORT_FILE}, {TRANSPORT_INFO})",
            hint="point it at the transport/ folder `pkt transport RECIPE` wrote, or remove it to compute the transport",
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / TRANSPORT_INFO).read_text())
        tensors = load_file(str(folder / TRANSPORT_FILE))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise RecipeError(
            f"method.transport '{folder}' cannot be read ({type(err).__name__}: {str(err)[:120]})",
            hint="delete that folder and run `pkt transport` again (or remove method.transport)",
        ) from None
    if meta.get("student") != ctx.recipe.student.identity():
        raise IncompatiblePairError(
            f"method.transport '{folder}' was made for the student {meta.get('student', {}).get('model')}, not "
            f"{ctx.recipe.student.model}",
            hint="run `pkt transport` with this recipe, or remove method.transport",
        )
    moved = {}
    for key, t in tensors.items():
        layer, role = key.split(".", 1)
        want = tuple(student.arch.role_weight(student.model, int(layer), role).shape)
        if tuple(t.shape) != want:
            raise IncompatiblePairError(
                f"method.transport '{folder}': update {key} has shape {tuple(t.shape)}, the student's weight {want}",
                hint="run `pkt transport` with this recipe, or remove method.transport",
            )
        moved[(int(layer), role)] = t.float()
    return moved, meta["info"]
