"""Seeking (Zhong et al., ICLR 2024), "PostPKT": teacher sensitivity -> selection -> SVD-initialised LoRA.

Reads like methods.md §1:

1. Sensitivity: S_i = Σ_j |θ_i · ∂L(x_j, y_j)/∂θ_i| over k seed samples, one backward each, streamed
   (``pktransfer.ops.sensitivity``): gradients are folded into accumulators and freed at once.
2. Layer selection: layer score = Σ S_i over a block; keep L_S layers (sensitivity / random / top /
   last / a list), in their original order; teacher layer #m of that list feeds student layer m.
3. Dimension reduction to the student's shape per weight (submatrix / row_column / neuron / random /
   uniform); embedding and lm_head along the hidden axis only. Module groups: embed, attention, ffn.
4. Factorisation: W_x ≈ B A with B = U_r Σ_r, A = V_rᵀ.
5. Injection: the student's base becomes W_S − (α/r)·B A and the LoRA starts at (B, A), so the
   student's outputs at step 0 are unchanged. The saved adapter is rebased onto the *unmodified*
   student: W_S − s·B0A0 + s·BA = W_S + s·[B | −B0][A ; A0] (rank 2r), a plain PEFT LoRA
   (``methods.base.save_rebased_adapter``).
6. Fine-tuning: the shared LoRA training loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from pktransfer.config import MethodConfig, hash_view
from pktransfer.data import encode_items, recipe_formatter
from pktransfer.errors import DataError, IncompatiblePairError, RecipeError
from pktransfer.fileio import save_safetensors, write_json
from pktransfer.methods.base import Method, MethodContext, SharedWork, Verb, n_tokens, needs_seed_split
from pktransfer.methods.injection import group_roles, lora_started_at, stack_roles, targeted_roles, teacher_for_injection
from pktransfer.models.arch import ATTENTION_ROLES, FFN_ROLES, ROLES_OF_LEAF, ArchitectureDescription
from pktransfer.models.pair import check_pair
from pktransfer.models.tying import parameter_key
from pktransfer.ops.offload import parked, stored_value
from pktransfer.ops.selection import reduce_dims, select_layers
from pktransfer.ops.sensitivity import ParamSensitivity, Sensitivity, sensitivity_over
from pktransfer.progress import Progress
from pktransfer.training import resolved_lora

# ---- 1. sensitivity -------------------------------------------------------------------------------


def save_sensitivity(sens: Sensitivity, folder: Path) -> None:
    """``sensitivity.safetensors`` (every accumulator) and ``sensitivity.json`` (layout, samples, meta)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in sens.params.items():
        tensors.update(p.tensors(name))
    save_safetensors(tensors, folder / "sensitivity.safetensors")
    layout = {
        name: {"mode": p.mode, "shape": list(p.shape), **({"parts": list(p.parts)} if p.parts else {})}
        for name, p in sens.params.items()
    }
    # the layout is written last: a folder with sensitivity.json holds a whole sensitivity.safetensors
    write_json(folder / "sensitivity.json", {"n_samples": sens.n_samples, "meta": sens.meta, "params": layout})


def load_sensitivity(folder: Path) -> Sensitivity:
    from safetensors.torch import load_file

    info = json.loads((folder / "sensitivity.json").read_text())
    tensors = load_file(str(folder / "sensitivity.safetensors"))
    params = {
        name: ParamSensitivity(
            mode=lay["mode"],
            shape=tuple(lay["shape"]),
            total=tensors[f"{name}::total"].reshape(()).double(),
            rows=tensors.get(f"{name}::rows"),
            cols=tensors.get(f"{name}::cols"),
            full=tensors.get(f"{name}::full"),
            parts=tuple(lay["parts"]) if "parts" in lay else None,
        )
        for name, lay in info["params"].items()
    }
    return Sensitivity(params, info["n_samples"], info.get("meta", {}))


def accumulator_modes(arch: ArchitectureDescription, structure: str, roles: set[str], map_layers: set[int] | None = None) -> Any:
    """What each teacher parameter must keep across seed samples (the streaming memory floor). ``map_layers``: the
    layers whose weights keep their per-element map (the submatrix structure); the others keep row and column sums
    (what a map dropped after selection leaves, so a saved sensitivity serves the reduced structures for any layer)
    (None: every layer)."""
    embed_names = {arch.embed_module + ".weight", arch.lm_head_module + ".weight"}
    prefix = arch.layers_path + "."

    def mode_for(name: str, shape: tuple[int, ...]) -> str:
        if len(shape) != 2:
            return "total"
        if name in embed_names:
            return "cols"  # reduced along the hidden axis only (same vocabulary)
        leaf = name.rsplit(".", 2)[-2]
        if not set(ROLES_OF_LEAF.get(leaf, ())) & roles:
            return "total"  # only counts towards the layer score
        if structure != "submatrix":
            return "reduced"
        if map_layers is not None and name.startswith(prefix) and int(name[len(prefix) :].split(".", 1)[0]) not in map_layers:
            return "reduced"  # not (or cannot be) selected: row and column sums, as a dropped map leaves behind
        return "full"

    return mode_for


def vocab_modules(arch: ArchitectureDescription) -> dict[str, str]:
    """Embedding and lm_head are streamed through module hooks (no dense gradient), unless tied:
    a shared weight's gradient is the sum of both uses, which only the parameter hook sees."""
    if arch.tied_embeddings:
        return {}
    return {arch.embed_module: "embedding", arch.lm_head_module: "linear"}


def compute_sensitivity(
    teacher: Any,
    items: list[Any],
    spec: Any,
    roles: set[str],
    *,
    formatter: Any,
    max_length: int,
    progress: Progress,
    what: str,
    map_layers: set[int] | None = None,
) -> Sensitivity:
    """``formatter``: the teacher's; in tulu mode it is the ``seeking-extract`` variant, as the official extraction
    script assembles its samples. ``map_layers``: see :func:`accumulator_modes`."""
    examples = encode_items(formatter, items[: spec.n_seed], max_length, what)
    device = teacher.device
    batches = (
        {"input_ids": torch.tensor([e.input_ids], device=device), "labels": torch.tensor([e.labels], device=device)}
        for e in examples
    )
    map_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.map_dtype]
    with progress.task("seeking: sensitivity per seed sample", total=len(examples)) as advance:
        sens = sensitivity_over(
            teacher.model,
            batches,
            accumulator_modes(teacher.arch, spec.structure, roles, map_layers),
            map_dtype=map_dtype,
            vocab_modules=vocab_modules(teacher.arch),
            row_parts=teacher.arch.fused_parts(),
            checkpointing=spec.gradient_checkpointing,
            on_sample=lambda s: advance(1, s_per_sample=f"{s:.1f}"),
        )
    sens.meta = {
        "teacher": teacher.name,
        "n_seed": len(examples),
        "structure": spec.structure,
        "map_dtype": spec.map_dtype,
        "roles": sorted(roles),
        "tokens": n_tokens(examples),
    }
    return sens


def sensitivity_summary(sens: Sensitivity, arch: ArchitectureDescription) -> dict[str, Any]:
    """Per-layer scores and per-module totals (what `pkt extract` reports as JSON)."""
    layers = []
    for i in range(arch.n_layers):
        prefix = f"{arch.layers_path}.{i}."
        modules = {
            n[len(prefix) :].removesuffix(".weight"): float(p.total) for n, p in sens.params.items() if n.startswith(prefix)
        }
        layers.append({"layer": i, "score": sum(modules.values()), "modules": modules})
    other = {n: float(p.total) for n, p in sens.params.items() if not n.startswith(arch.layers_path + ".")}
    return {"n_samples": sens.n_samples, "meta": sens.meta, "layers": layers, "global": other}


def locate(
    teacher: Any, student_arch: ArchitectureDescription, ctx: MethodContext, spec: Any, workdir: Path
) -> tuple[Sensitivity, list[int]]:
    """Steps 1-2: sensitivity over the seed split (or a saved one) and the teacher layers to transfer."""
    roles = group_roles(spec.modules)
    own = workdir / "sensitivity"
    if not spec.sensitivity and (own / "sensitivity.safetensors").is_file():
        # a resumed run: its own sensitivity is already saved (the residual base is rebuilt from it)
        spec = spec.model_copy(update={"sensitivity": str(own)})
    if spec.sensitivity:
        folder = Path(spec.sensitivity)
        if not (folder / "sensitivity.safetensors").is_file():
            raise DataError(
                f"no saved sensitivity in '{folder}'",
                hint="point method.sensitivity at the sensitivity/ folder written by `pkt extract`",
            )
        sens = load_sensitivity(folder)
        ctx.progress.log(f"seeking: reusing sensitivity from {folder} ({sens.n_samples} samples)")
    else:
        sens = measured_sensitivity(teacher, student_arch, ctx, spec, roles)
    scores = sens.block_scores(teacher.arch.layers_path, teacher.arch.n_layers)
    try:
        layers = select_layers(scores, student_arch.n_layers, spec.layers, seed=ctx.recipe.seed)
    except ValueError as err:
        raise RecipeError(
            f"method.layers: {err}", hint=f"the student has {student_arch.n_layers} layers, the teacher {teacher.arch.n_layers}"
        ) from None
    for name, p in sens.params.items():  # maps of layers that can no longer be selected
        if name.startswith(teacher.arch.layers_path + ".") and int(name.split(".")[2]) not in layers:
            p.drop_map()
    if not spec.sensitivity:
        save_sensitivity(sens, own)  # a reused sensitivity is not copied (it can be GBs); summary.json names its source
    own.mkdir(parents=True, exist_ok=True)
    summary = sensitivity_summary(sens, teacher.arch)
    summary.update(
        {
            "source": str(Path(spec.sensitivity).resolve()) if spec.sensitivity else "computed here",
            "selected_layers": layers,
            "layer_strategy": spec.layers,
            "mapping": {f"student.{m}": f"teacher.{t}" for m, t in enumerate(layers)},
        }
    )
    write_json(own / "summary.json", summary)
    ctx.progress.log(f"seeking: teacher layers {layers} -> student layers 0..{len(layers) - 1}")
    return sens, layers


def measured_sensitivity(
    teacher: Any, student_arch: ArchitectureDescription, ctx: MethodContext, spec: Any, roles: set[str]
) -> Sensitivity:
    """Step 1 over the seed split, with the submatrix structure's per-element maps kept as ``spec.maps`` says.

    ``all_layers`` (the official code's way): one pass, a map for every teacher layer (for Llama-2 13B: 40 layers of
    float32 maps, 50.8 GB). ``selected_layers``: the maps of the layers selection picks only. Where the layer strategy
    does not read the scores (first, uniform, last, random, a list) the layers are known before the pass and one pass
    keeps their maps; with ``sensitivity`` a first pass gives the layer scores, selection picks the layers, and a
    second pass over the same samples keeps those layers' maps. Exact: the scores are the same sums either way (the
    totals are accumulated alike whatever else a weight keeps) and the second pass's maps are the first's gradients
    again; it costs a second forward and backward over the seed samples (counted as teacher work)."""
    seed_items = ctx.task.split("seed")
    formatter = recipe_formatter(teacher.tokenizer, ctx.task, ctx.recipe.task, variant="seeking-extract")
    max_length, what = ctx.recipe.training.max_length, f"task '{ctx.task.name}' seed split"

    def one_pass(map_layers: set[int] | None, label: str) -> Sensitivity:
        t0 = time.perf_counter()
        sens = compute_sensitivity(
            teacher, seed_items, spec, roles, formatter=formatter, max_length=max_length, progress=ctx.progress,
            what=what, map_layers=map_layers,
        )  # fmt: skip
        tokens = sens.meta["tokens"]
        ctx.teacher_work.add(
            f"sensitivity{label}: {sens.n_samples} seed samples, forward + backward",
            forward_tokens=tokens,
            backward_tokens=tokens,
            seconds=time.perf_counter() - t0,
            parameters=teacher.arch.n_parameters,
        )
        return sens

    if spec.maps == "all_layers" or spec.structure != "submatrix":
        return one_pass(None, "")
    n_t, n_s = teacher.arch.n_layers, student_arch.n_layers
    if spec.layers != "sensitivity":  # the layers do not depend on the scores: their maps alone, in one pass
        try:
            known = set(select_layers([0.0] * n_t, n_s, spec.layers, seed=ctx.recipe.seed))
        except ValueError as err:
            raise RecipeError(f"method.layers: {err}", hint=f"the student has {n_s} layers, the teacher {n_t}") from None
        return one_pass(known, "")
    scored = one_pass(set(), " (pass 1 of 2: layer scores)")
    chosen = select_layers(scored.block_scores(teacher.arch.layers_path, n_t), n_s, spec.layers, seed=ctx.recipe.seed)
    mapped = one_pass(set(chosen), " (pass 2 of 2: the selected layers' maps)")
    mapped.meta["passes"] = 2
    return mapped


# ---- 2-3. selection and extraction ----------------------------------------------------------------


def extract_matrices(
    sens: Sensitivity,
    teacher: Any,
    student_arch: ArchitectureDescription,
    layers: list[int],
    roles: set[str],
    structure: str,
    seed: int,
    grow: str,
    progress: Progress | None = None,
    selection: dict[str, dict[str, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Student module name -> student-shaped matrix cut from the teacher (float32). A fused module's matrix
    stacks its roles' blocks, each cut from the teacher's block of the same role with that role's sensitivity.
    ``selection``: filled with each student weight's teacher module and the teacher rows and columns it was cut from
    (``index_ranges``), so a run keeps which submatrix it chose."""
    t_arch: ArchitectureDescription = teacher.arch
    parts: list[tuple[str, torch.Tensor]] = []
    jobs: list[tuple[str, str, str, slice, tuple[int, ...]]] = []  # (student module, teacher module, role, rows, shape)
    for role in ("embed", "lm_head"):
        if role in roles:
            mod = t_arch.embed_module if role == "embed" else t_arch.lm_head_module
            smod = student_arch.embed_module if role == "embed" else student_arch.lm_head_module
            shape = next(w.shape for w in student_arch.global_weights() if w.role == role)
            jobs.append((smod, mod, role, slice(None), shape))
    for m, t_layer in enumerate(layers):
        s_shapes = {w.role: w.shape for w in student_arch.layer_weights(m)}
        for role in [*ATTENTION_ROLES, *FFN_ROLES]:
            if role in roles:
                smod, tmod = student_arch.module_name(m, role), t_arch.module_name(t_layer, role)
                jobs.append((smod, tmod, role, t_arch.role_rows(role), s_shapes[role]))
    with (progress or Progress(quiet=True)).task("seeking: extract per module", total=len(jobs)) as advance:
        for smod, tmod, role, rows, shape in jobs:
            block, (r_idx, c_idx) = _extract_one(sens, teacher.model, smod, tmod, role, rows, shape, structure, seed, grow)
            parts.append((smod, block))
            if selection is not None:
                selection[f"{smod}:{role}"] = {"teacher": tmod, "rows": index_ranges(r_idx), "cols": index_ranges(c_idx)}
            advance(1)
    return stack_roles(parts)


def _extract_one(
    sens: Sensitivity,
    t_model: Any,
    smod: str,
    tmod: str,
    role: str,
    rows: slice,
    target: tuple[int, ...],
    structure: str,
    seed: int,
    grow: str,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One student-shaped matrix cut from ``role``'s rows of the teacher weight ``tmod`` (zero-padded where
    it grows), and the teacher row and column indices it was cut from.

    A tied teacher's ``lm_head`` is its embedding matrix: weight and sensitivity come from that one
    parameter (its gradient sums both uses)."""
    w_t = stored_value(t_model.get_submodule(tmod)).detach()[rows]
    try:
        p = sens.params[parameter_key(t_model, tmod)].role(rows)
    except ValueError as err:
        raise DataError(
            f"the sensitivity in use cannot be split into {tmod}'s roles: {err}",
            hint="recompute it (leave method.sensitivity unset): this version keeps a fused weight's sums per role",
        ) from None
    src = tuple(w_t.shape)
    grown = [(ax, t, s) for ax, t, s in zip(("rows", "columns"), src, target, strict=True) if s > t]
    if grown and grow == "error":
        ax, t, s = grown[0]
        raise IncompatiblePairError(
            f"seeking: student weight {smod} has {s} {ax} but the teacher's {tmod} only {t}",
            hint="set method.grow: pad (zero-pad the extracted matrix) or leave this module group out",
        )
    fit = tuple(min(t, s) for t, s in zip(src, target, strict=True))
    if role in ("embed", "lm_head"):  # [vocab, hidden]: the hidden axis only
        cols = p.cols if p.cols is not None else torch.zeros(src[1])
        _, c_idx = reduce_dims(
            structure,
            (1, fit[1]),
            rows=torch.zeros(1),
            cols=cols,
            source=(1, src[1]),
            full=cols.reshape(1, -1) if structure == "submatrix" else None,
            seed=seed,
        )
        block = w_t[:, c_idx]
        r_idx = torch.arange(src[0])
    else:
        if structure == "submatrix" and p.full is None:
            raise DataError(
                f"the sensitivity in use has no per-element map for {tmod}, which the submatrix "
                "structure needs (maps of layers that were not selected are dropped when saved)",
                hint="recompute it (leave method.sensitivity unset), keep the layer choice it was "
                "extracted with, or use a reduced structure such as row_column",
            )
        role_seed = seed + 1000 * [*ATTENTION_ROLES, *FFN_ROLES].index(role)  # stable across processes
        r_idx, c_idx = reduce_dims(structure, fit, full=p.full, rows=p.rows, cols=p.cols, source=src, seed=role_seed)
        block = w_t[r_idx][:, c_idx]
    mat = torch.zeros(target, dtype=torch.float32)
    mat[: block.shape[0], : block.shape[1]] = block.float().cpu()
    return mat, (r_idx, c_idx)


def index_ranges(idx: torch.Tensor) -> list[list[int]]:
    """Indices as [start, stop) ranges in their order: one range for a contiguous block (the submatrix)."""
    out: list[list[int]] = []
    for i in idx.flatten().tolist():
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


class SeekingConfig(MethodConfig):
    """Seeking (methods.md §1): teacher sensitivity -> layer/dimension selection -> SVD-initialised LoRA."""

    name: Literal["seeking"] = "seeking"
    n_seed: int = Field(default=32, ge=1, description="seed samples for the sensitivity (paper: 32)")
    layers: Literal["sensitivity", "random", "top", "last"] | list[int] = "sensitivity"
    structure: Literal["submatrix", "row_column", "neuron", "random", "uniform"] = "submatrix"
    modules: list[Literal["embed", "attention", "ffn", "all"]] = Field(default_factory=lambda: ["all"], min_length=1)
    map_dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="dtype of the submatrix map")
    maps: Literal["selected_layers", "all_layers"] = Field(
        default="selected_layers",
        description="submatrix structure: keep per-element maps for the selected teacher layers only (a second pass "
        "over the seed samples when the layers are chosen by sensitivity; the same maps and layers) or for every layer "
        "in one pass, as the official code (Llama-2 13B in float32: 50.8 GB of maps)",
    )
    sensitivity: str | None = Field(default=None, description="reuse a saved sensitivity folder (pkt extract)")
    gradient_checkpointing: bool = False
    grow: Literal["error", "pad"] = Field(
        default="error", description="a student dimension larger than the teacher's: refuse, or zero-pad"
    )


class SeekingMethod(Method):
    config_class = SeekingConfig
    needs_teacher = True
    teacher_use = "weights"
    is_start = True

    def prepare(self, ctx: MethodContext) -> Any:
        spec, recipe = self.spec, ctx.recipe
        roles = group_roles(spec.modules)
        teacher = teacher_for_injection(ctx, self.name)
        targets = targeted_roles(resolved_lora(recipe.lora, ctx.student.arch).target_modules) & roles
        selection: dict[str, dict[str, Any]] = {}
        with parked(ctx.student.model):  # steps 1-3 read only the student's shape: its weights wait off the GPU
            sens, layers = locate(teacher, ctx.student.arch, ctx, spec, ctx.workdir)
            matrices = extract_matrices(
                sens, teacher, ctx.student.arch, layers, targets, spec.structure, recipe.seed, spec.grow, ctx.progress,
                selection,
            )  # fmt: skip
        write_json(
            ctx.workdir / "seeking.json",
            {
                "layer_scores": sens.block_scores(teacher.arch.layers_path, teacher.arch.n_layers),
                "selected_layers": layers,
                "mapping": {f"student.{m}": f"teacher.{t}" for m, t in enumerate(layers)},
                "structure": spec.structure,
                "groups": spec.modules,
                "roles_injected": sorted(t for t in targets if t),
                "n_seed": sens.n_samples,
                # the teacher rows and columns each student weight was cut from ([start, stop) ranges; a record of the
                # cell carries this file, so which submatrix was chosen survives without the weights)
                "selection": selection,
            },
        )
        model, self.initial_lora = lora_started_at(ctx, matrices)
        return model

    # ---- what a comparison shares, and the extra verbs ----------------------------------------------

    @classmethod
    def shared_work(cls, recipe: Any, shared_root: Path) -> SharedWork:
        """The sensitivity depends on the teacher, seed split, tokenisation and accumulators, not on the seed
        (except through a random layer choice): one ``pkt extract`` serves every cell that needs the same."""
        m = recipe.method
        if m.sensitivity is not None:
            return SharedWork(recipe)
        what = {
            "teacher": recipe.teacher.identity(),
            "task": hash_view("task", recipe.task.model_dump()),
            "max_length": recipe.training.max_length,
            # (maps changes which pass holds which map, not the sensitivity saved: both give the same file's content)
            "method": m.model_dump(exclude={"sensitivity", "maps"}),
            "seed": recipe.seed if m.layers == "random" else None,
        }
        return SharedWork.once(recipe, shared_root, "seeking", what, "sensitivity", "extract")

    @classmethod
    def verbs(cls) -> dict[str, Verb]:
        return {
            "extract": Verb(
                "Seeking steps 1-2: teacher sensitivity over the seed split and the layer selection. "
                "Writes sensitivity/; reuse it with method.sensitivity.",
                _extract,
                needs_seed_split,
            ),
            "inject": Verb(
                "Seeking steps 1-5 without training: adapter_init/ (the teacher-initialised LoRA) and "
                "residual/ (W − (α/r)BA); together they equal the original student.",
                _inject,
                needs_seed_split,
            ),
        }


def _extract(method: SeekingMethod, ctx: MethodContext, log: Any) -> dict[str, Any]:
    """Steps 1-2 only. Writes ``sensitivity/`` (safetensors + summary.json with per-layer and per-module
    figures); a recipe reuses it with ``method.sensitivity: OUTPUT/sensitivity``."""
    teacher = ctx.load_teacher()
    check_pair(teacher.arch, ctx.student.arch, teacher.tokenizer, ctx.student.tokenizer, method.name)
    with log.stage("sensitivity"):
        sens, layers = locate(teacher, ctx.student.arch, ctx, method.spec, ctx.workdir)
    return {"selected_layers": layers, "n_samples": sens.n_samples, "outputs": {"sensitivity": "sensitivity"}}


def _inject(method: SeekingMethod, ctx: MethodContext, log: Any) -> dict[str, Any]:
    """Steps 1-5 without training. Writes ``adapter_init/`` (the PEFT adapter at (B, A)) and ``residual/`` (the
    student whose weights are W − (α/r)·B A, loadable with ``from_pretrained``): together they equal the
    original student. Records the largest step-0 logit difference to the original student on a seed item."""
    from transformers import set_seed

    probe = torch.tensor([ctx.formatter.encode_prompt(ctx.task.split("seed")[0].prompt)])
    with torch.no_grad():
        before = ctx.student.model(input_ids=probe.to(ctx.student.device)).logits.float()
    set_seed(ctx.recipe.seed)
    with log.stage("prepare"):
        peft_model = method.prepare(ctx)
    peft_model.eval()  # the new LoRA dropout modules start in training mode: the probe must not drop anything
    with torch.no_grad():
        after = peft_model(input_ids=probe.to(ctx.student.device)).logits.float()
    peft_model.save_pretrained(str(ctx.workdir / "adapter_init"))
    residual = peft_model.unload()
    residual.save_pretrained(str(ctx.workdir / "residual"), safe_serialization=True)
    ctx.student.tokenizer.save_pretrained(str(ctx.workdir / "residual"))
    return {
        "step0_max_logit_diff": float((after - before).abs().max()),
        "outputs": {"adapter_init": "adapter_init", "residual": "residual", "sensitivity": "sensitivity"},
    }
