"""SemAlign (Gu et al., Findings of ACL 2026): teacher *activations*, mapped into the student's space through
vocabulary-based semantic bases, supervise paired student layers. Reads like methods.md §3:

1. Layer attribution: Layer Gradient × Activation on the teacher, Σ over tokens and channels of
   h_l ⊙ ∂L/∂h_l at each layer's output, averaged over the seed samples (L: the sample's mean cross
   entropy on its response). The top ``critical_layers`` teacher layers are the critical ones.
2. Layer pairing (``ops.semantic``): critical layer l* -> student layer k = min{k' : l_{k'} >= l*}; the
   target of student layer k interpolates teacher layers a, b (λ) around u = L_T·k/L_S.
3. Semantic bases: s_i = e_i · pinv(Wᵀ) per model (unit rows), needing a shared vocabulary; only the
   D×D factor (WᵀW)⁺ per model and the pair's map M = S_Sᵀ S_T are kept (cached on disk).
4. Decompose / recompose: h~_S = S_Sᵀ (S_T h_T / ||h_T||) = M h_T / ||h_T||. No learned projection.
   ``decomposition: dual`` (ours, not the paper's): h~_S = W_S⁺ (W_T h_T), exact within one model.
5. Training: LoRA (the paper: r 16 on up, down, v, o of the paired layers) with
   loss = [1 − mean cos(h_S^(k), h~_S^(k))] + [1 − mean cos(z, onehot(y))] over response positions,
   at the sublayer output before the residual add (``point: mlp`` by default). The teacher's targets
   are computed once and cached (``cache: true``), so the teacher is freed before training; with
   ``schedule: shallow_to_deep`` the pairs are trained one after another, each for an equal share of
   the steps, only that layer's LoRA updated. ``output_loss: kl`` (ours, not paper v1) replaces the
   one-hot cosine by T²·KL(teacher_T ‖ student_T) on the teacher's cached top-k logits (KD's cache).

Positions are the ones the plain loss uses: those whose next token belongs to the response.

``version: v2`` (the authors' revision, arXiv v2 / ACL 2026; every detail the text leaves open is "our reading" in
docs/methods/semalign.md): exactly one source teacher layer per student layer (``ops.semantic.one_source_per_target``),
a shallow-to-deep frontier schedule over every student layer (only the frontier layer's LoRA trains), and per stage
the frontier layer's objective plus output KL: ``relation``, ‖G(r_S) − G(M r_T)‖² between the centred, normalised
token-token Grams of the layer's residual contribution and the aligned source residual; or ``fisher``, ½dᵀFd on the
target-space aligned logits.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from pktransfer.config import MethodConfig
from pktransfer.data import IGNORE_INDEX, Example, encode_items
from pktransfer.errors import DataError, IncompatiblePairError
from pktransfer.fileio import write_json
from pktransfer.methods.base import Method, MethodContext, SharedWork, n_tokens
from pktransfer.methods.teacher_cache import (
    PerExampleCache,
    cache_key,
    cached_file,
    live_teacher,
    pack_per_example,
    teacher_identity,
    teacher_logits_cache,
)
from pktransfer.models.arch import ArchitectureDescription
from pktransfer.models.pair import check_pair
from pktransfer.ops.distill import kl_to_teacher
from pktransfer.ops.offload import input_device, stored_value
from pktransfer.ops.semantic import (
    LayerPair,
    alignment_terms,
    centred_gram,
    dual_map,
    fisher_quadratic,
    gram_pinv,
    grid_layer,
    interpolate,
    layer_pairs,
    map_activations,
    one_source_per_target,
    recompose_map,
    relation_distance,
    top_layers,
)
from pktransfer.progress import Progress
from pktransfer.training import LossFn, check_targets, collate_examples, lora_config, response_positions, response_rows

# ---- activation capture (forward hooks) -----------------------------------------------------------


def sublayer(model: Any, arch: ArchitectureDescription, layer: int, point: str) -> Any:
    """The module whose output is supervised: layer ``layer`` (0-based)'s MLP or attention output as it enters the
    residual stream (after the post-norm in Gemma 2/3 and OLMo-2, the family entry's ``mlp_out``), or the layer."""
    return model.get_submodule(arch.sublayer_name(layer, point))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(modules: dict[int, Any], store: dict[int, torch.Tensor], when: Any = None) -> Iterator[None]:
    """Forward hooks writing each module's output tensor (graph kept) into ``store[key]``."""

    def hook_for(key: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if when is None or when():
                store[key] = _first(output)

        return hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_residuals(
    modules: dict[int, Any], store: dict[int, tuple[torch.Tensor, torch.Tensor]], when: Any = None
) -> Iterator[None]:
    """Forward hooks writing each decoder layer's (input, output) hidden states (graph kept) into ``store[key]``: the
    layer's residual contribution is output − input."""

    def hook_for(key: int) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if when is None or when(key):
                store[key] = (args[0] if args else kwargs["hidden_states"], _first(output))

        return hook

    handles = [m.register_forward_hook(hook_for(k), with_kwargs=True) for k, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- 1. layer attribution -------------------------------------------------------------------------


def layer_attribution(
    model: Any, layers_path: str, n_layers: int, examples: list[Example], *, batch_size: int, progress: Progress
) -> list[float]:
    """Mean over samples of Σ_tokens,channels h_l ⊙ ∂L/∂h_l at each layer's output (one score per layer).

    Parameters are frozen for the duration, so the backward pass computes activation gradients only.
    """
    device = input_device(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    acts: dict[int, torch.Tensor] = {}
    layers = {i: model.get_submodule(f"{layers_path}.{i}") for i in range(n_layers)}
    embed_hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    totals = torch.zeros(n_layers, dtype=torch.float64)
    try:
        with capture(layers, acts), progress.task("semalign: layer attribution", total=len(examples)) as advance:
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = collate_examples(chunk)
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                labels = batch["labels"][:, 1:].to(device)
                wide = torch.promote_types(logits.dtype, torch.float32)  # at least float32, float64 stays
                resp = labels != IGNORE_INDEX  # the CE only at response positions: no [B, L, V] float copy
                ce = torch.nn.functional.cross_entropy(logits[:, :-1][resp].to(wide), labels[resp], reduction="none")
                sums = torch.zeros(len(chunk), dtype=wide, device=device).index_add(0, resp.nonzero()[:, 0], ce)
                per_sample = sums / resp.sum(1).clamp_min(1)  # each sample's own mean CE
                grads = torch.autograd.grad(per_sample.sum(), [acts[i] for i in range(n_layers)])
                keep = mask.unsqueeze(-1).to(wide)
                for i, g in enumerate(grads):
                    totals[i] += float((acts[i].detach().to(wide) * g.to(wide) * keep).sum(dtype=torch.float64))
                acts.clear()
                advance(len(chunk))
    finally:
        embed_hook.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return (totals / max(1, len(examples))).tolist()


# ---- 3. semantic bases and the pair's map ---------------------------------------------------------


def lm_head(loaded: Any, vocab: int) -> torch.Tensor:
    """The LM head's rows for the shared vocabulary (padding rows beyond the tokenizer are left out)."""
    return stored_value(loaded.model.get_output_embeddings()).detach()[:vocab]


def head_fingerprint(weight: torch.Tensor, chunk: int = 8192) -> str:
    """Cheap identity of an LM head: shape, dtype, sums and a strided sample of rows. The float64 sums run over
    ``chunk`` rows at a time: a whole-head float64 copy (and its square) was 3.7 GB beside a 1.5B teacher's head."""
    w = weight.detach()
    rows = w[:: max(1, w.shape[0] // 64)].float().cpu()
    h = hashlib.sha256(f"{tuple(w.shape)}|{w.dtype}".encode())
    h.update(rows.numpy().tobytes())
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    square = torch.zeros((), dtype=torch.float64, device=w.device)
    for r in range(0, w.shape[0], chunk):
        part = w[r : r + chunk].double()
        total += part.sum()
        square += part.square().sum()
    h.update(str(float(total)).encode() + str(float(square)).encode())
    return h.hexdigest()[:20]


def head_pinv(head: torch.Tensor, folder: Path, chunk: int, progress: Progress, fingerprint: str | None = None) -> torch.Tensor:
    """(WᵀW)⁺ of an LM head, cached in ``folder`` by the head's fingerprint (``fingerprint``: already computed)."""
    from safetensors.torch import load_file

    compute = lambda: {"pinv": gram_pinv(head, chunk)}  # noqa: E731
    key = fingerprint or head_fingerprint(head)
    return load_file(str(cached_file(folder, "semantic-pinv", key, compute, progress)))["pinv"]


def pair_map(
    teacher_head: torch.Tensor,
    student_head: torch.Tensor,
    folder: Path,
    chunk: int,
    progress: Progress,
    decomposition: str = "paper_v1",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The pair's map [D_S, D_T], with each model's (WᵀW)⁺ and the map cached in ``folder``:
    paper_v1 M = S_Sᵀ S_T; dual M = (W_SᵀW_S)⁺ W_Sᵀ W_T."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    fp_t, fp_s = head_fingerprint(teacher_head), head_fingerprint(student_head)
    pinv = {
        fp_t: head_pinv(teacher_head, folder, chunk, progress, fp_t),
        fp_s: head_pinv(student_head, folder, chunk, progress, fp_s),
    }

    def compute() -> dict[str, torch.Tensor]:
        with progress.task("semalign: semantic bases -> recomposition map", total=1) as advance:
            if decomposition == "dual":
                m = dual_map(teacher_head, student_head, chunk, pinv[fp_s])
            else:
                m = recompose_map(teacher_head, student_head, chunk, pinv[fp_t], pinv[fp_s])
            advance(1)
        return {"map": m}

    prefix = "semantic-map" if decomposition == "paper_v1" else f"semantic-map-{decomposition}"
    m = load_file(str(cached_file(folder, prefix, f"{fp_t}-{fp_s}", compute, progress)))["map"]
    return m, {
        "seconds": round(time.perf_counter() - t0, 2),
        "shape": list(m.shape),
        "teacher_head": fp_t,
        "student_head": fp_s,
        "vocab": int(teacher_head.shape[0]),
        "decomposition": decomposition,
    }


# ---- 4. teacher targets ---------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (every activation needed has been captured)."""


def _stop_forward(module: Any, args: Any, output: Any) -> None:
    raise _StopForward


@torch.no_grad()
def teacher_targets(
    teacher: Any,
    pairs: list[LayerPair],
    point: str,
    m: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> list[torch.Tensor]:
    """Per pair, the recomposed targets h~_S [P, D_S] (unit rows, float32) at the batch's response positions."""
    model = teacher.model
    device = input_device(model)
    needed = sorted({layer - 1 for p in pairs for layer in (p.a, p.b)})
    acts: dict[int, torch.Tensor] = {}
    layers_path = teacher.arch.layers_path
    with capture({i: sublayer(model, teacher.arch, i, point) for i in needed}, acts):
        # the forward stops once the deepest needed layer has run: later layers and the LM head are skipped.
        # Registered after the capture hooks, so with point 'layer' (the same module) the capture runs first.
        stop = model.get_submodule(f"{layers_path}.{needed[-1]}").register_forward_hook(_stop_forward)
        try:
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        except _StopForward:
            pass
        finally:
            stop.remove()
    mask = response_positions(labels).to(device)
    out = []
    for p in pairs:
        a, b = acts[p.a - 1].float().to(device), acts[p.b - 1].float().to(device)  # layers may sit on several devices
        h = interpolate(a, b, p.weight_b)[:, :-1][mask]
        t = map_activations(h, m)
        out.append((t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu())
    return out


def precompute_targets(
    teacher: Any,
    pairs: list[LayerPair],
    point: str,
    m: torch.Tensor,
    examples: list[Example],
    batch_size: int,
    progress: Progress,
) -> dict[str, torch.Tensor]:
    """Targets for every training example: ``pair.K`` [P_total, D_S] float16 and ``offsets`` [N + 1]."""
    parts: dict[int, list[torch.Tensor]] = {p.student: [] for p in pairs}
    counts: list[int] = []
    with progress.task("semalign: teacher targets", total=len(examples)) as advance:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate_examples(chunk)
            for p, t in zip(
                pairs,
                teacher_targets(teacher, pairs, point, m, batch["input_ids"], batch["attention_mask"], batch["labels"]),
                strict=True,
            ):
                parts[p.student].append(t.half())
            counts.extend(int(c) for c in response_positions(batch["labels"]).sum(1))
            advance(len(chunk))
    return pack_per_example(counts, {f"pair.{k}": v for k, v in parts.items()})


# ---- 4'. v2 targets: the aligned supervisory residual's relation geometry, or aligned hidden states ---------


def v2_positions(batch: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    """[B, L] bool: the tokens whose relation geometry is matched (every real token, or the response positions)."""
    if which == "all":
        return batch["attention_mask"].bool()
    mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    mask[:, :-1] = response_positions(batch["labels"])
    return mask


@torch.no_grad()
def teacher_targets_v2(
    teacher: Any, pairs: list[LayerPair], m: torch.Tensor, batch: dict[str, torch.Tensor], objective: str, positions: str
) -> list[list[torch.Tensor]]:
    """Per pair, per example: ``relation``: the centred, normalised Gram [T, T] of the aligned supervisory residual
    M·(h_T^(j) − h_T^(j−1)) over the example's positions; ``fisher``: the aligned hidden states M·h_T^(j) [P, D_S] at
    its response positions."""
    model, arch = teacher.model, teacher.arch
    device = input_device(model)
    sources = sorted({p.a - 1 for p in pairs})
    acts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = {i: model.get_submodule(f"{arch.layers_path}.{i}") for i in sources}
    with capture_residuals(layers, acts):
        stop = layers[sources[-1]].register_forward_hook(_stop_forward)
        try:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        except _StopForward:
            pass
        finally:
            stop.remove()
    keep = v2_positions(batch, positions) if objective == "relation" else v2_positions(batch, "response")
    out: list[list[torch.Tensor]] = []
    for p in pairs:
        h_in, h_out = (t.float() for t in acts[p.a - 1])
        x = h_out - h_in if objective == "relation" else h_out
        per_example = []
        for b in range(x.shape[0]):
            aligned = x[b][keep[b].to(x.device)] @ m.T.to(x.device)
            per_example.append(centred_gram(aligned).flatten().cpu() if objective == "relation" else aligned.half().cpu())
        out.append(per_example)
    return out


def precompute_targets_v2(
    teacher: Any,
    pairs: list[LayerPair],
    m: torch.Tensor,
    examples: list[Example],
    batch_size: int,
    objective: str,
    positions: str,
    progress: Progress,
) -> dict[str, torch.Tensor]:
    """v2 targets for every training example, packed per example (a relation Gram is stored flattened)."""
    parts: dict[int, list[torch.Tensor]] = {p.student: [] for p in pairs}
    counts: list[int] = []
    with progress.task("semalign v2: teacher targets", total=len(examples)) as advance:
        for start in range(0, len(examples), batch_size):
            batch = collate_examples(examples[start : start + batch_size])
            per_pair = teacher_targets_v2(teacher, pairs, m, batch, objective, positions)
            for p, rows in zip(pairs, per_pair, strict=True):
                parts[p.student].extend(rows)
            counts.extend(int(r.shape[0]) for r in per_pair[0])
            advance(len(batch["input_ids"]))
    return pack_per_example(counts, {f"pair.{k}": v for k, v in parts.items()})


# ---- the method -----------------------------------------------------------------------------------


class SemAlignConfig(MethodConfig):
    """SemAlign (methods.md §3): teacher activations mapped through semantic bases supervise paired student layers."""

    name: Literal["semalign"] = "semalign"
    version: Literal["v1", "v2"] = Field(
        default="v1",
        description="v1: the seed's version (critical layers, cosine to recomposed activations); v2: the authors' "
        "revision (arXiv 2510.24208 v2 / ACL 2026 Findings): one source layer per target layer, a shallow-to-deep "
        "frontier schedule training one target layer at a time, a relation-geometry (or Fisher) layer objective and "
        "output KL (docs/methods/semalign.md)",
    )
    layer_objective: Literal["relation", "fisher"] = Field(
        default="relation",
        description="v2's layer objective: relation (arXiv v2): ||G(r_S) − G(M r_T)||² between centred, normalised "
        "token-token Grams of the frontier layer's residual contribution and the aligned teacher residual; fisher "
        "(ACL 2026): ½ dᵀ F d on target-space aligned logits (d = z_S − z_T, F the softmax Fisher at z_T)",
    )
    relation_positions: Literal["all", "response"] = Field(
        default="all",
        description="v2 relation: the tokens whose geometry is matched (every real token, our reading; or the response)",
    )
    n_seed: int = Field(default=32, ge=1, description="seed-split samples for the teacher's layer attribution")
    critical_layers: int | Literal["all"] = Field(
        default=4, description="how many top-attributed teacher layers to transfer ('all': pair every student layer)"
    )
    rank_by: Literal["score", "abs"] = Field(
        default="score", description="rank teacher layers by the signed gradient x activation sum, or its magnitude"
    )
    point: Literal["mlp", "attention", "layer"] = Field(
        default="mlp",
        description="supervised activation: a sublayer's output before the residual add (mlp or "
        "attention), or the whole layer's output",
    )
    target_modules: list[str] | None = Field(
        default_factory=lambda: ["up_proj", "down_proj", "v_proj", "o_proj"],
        description="LoRA targets (the paper's four); None: lora.target_modules",
    )
    lora_layers: Literal["paired", "all"] = Field(default="paired", description="LoRA on the paired layers only, or all")
    schedule: Literal["joint", "shallow_to_deep"] = Field(
        default="joint", description="train every pair at once, or one pair after another from shallow to deep"
    )
    activation_weight: float = Field(default=1.0, ge=0, description="weight of 1 − mean cos(h_S, h~_S)")
    logit_weight: float = Field(default=1.0, ge=0, description="weight of the output term (output_loss)")
    decomposition: Literal["paper_v1", "dual"] = Field(
        default="paper_v1",
        description="paper_v1: a = S_T h/||h|| on unit pseudo-inverse bases, h~ = S_Sᵀ a (the paper, arXiv v1); "
        "dual: a = W_T h (the teacher's logits), h~ = W_S⁺ a (exact within one model; not in the paper)",
    )
    output_loss: Literal["onehot_cosine", "kl"] = Field(
        default="onehot_cosine",
        description="onehot_cosine: 1 − cos(z, onehot(y)) (paper v1); kl: T²·KL(teacher_T ‖ student_T) on the "
        "teacher's top-k logits (KD's cache; not in paper v1)",
    )
    temperature: float = Field(default=2.0, gt=0, description="output_loss kl: the temperature T")
    top_k: int | None = Field(default=64, ge=1, description="output_loss kl: cached teacher logits per position")
    logits_cache: str | None = Field(default=None, description="output_loss kl: folder of the teacher logits cache")
    cache: bool = Field(
        default=True,
        description="precompute the teacher's targets once and free the teacher; "
        "false keeps the teacher in memory and maps its activations live",
    )
    cache_dir: str | None = Field(
        default=None, description="folder for semantic bases and cached targets (shared by runs; default: the run's folder)"
    )
    basis_chunk: int = Field(default=8192, ge=1, description="vocabulary rows per step of the basis computation")
    attribution_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="seed samples per forward and backward of the layer attribution (None: training.batch_size); "
        "memory only: each sample's loss is its own mean, so the scores do not depend on it",
    )

    @model_validator(mode="after")
    def _check(self) -> SemAlignConfig:
        if self.version == "v2":  # v2 fixes what v1 leaves open: every target layer, frontier schedule, output KL
            fixed = {"schedule": "shallow_to_deep", "output_loss": "kl", "point": "layer", "lora_layers": "paired"}
            for key, value in fixed.items():
                if key in self.model_fields_set and getattr(self, key) != value:
                    raise ValueError(f"version v2 uses {key}: {value} (the authors' revision); leave {key} unset")
                object.__setattr__(self, key, value)  # bypasses validate_assignment: this validator would run again
            if self.critical_layers != 4:  # (a dumped and re-read v2 config holds the default)
                raise ValueError("version v2 pairs every target layer with one source layer: leave critical_layers unset")
        elif (self.layer_objective, self.relation_positions) != ("relation", "all"):
            raise ValueError("layer_objective and relation_positions are version v2 settings (set version: v2)")
        if isinstance(self.critical_layers, int) and self.critical_layers < 1:
            raise ValueError("critical_layers must be at least 1 (or 'all')")
        if self.activation_weight == 0 and self.logit_weight == 0:
            raise ValueError("activation_weight and logit_weight are both 0: nothing to train")
        return self


class SemAlignMethod(Method):
    config_class = SemAlignConfig
    needs_teacher = True
    teacher_use = "outputs"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.pairs: list[LayerPair] = []
        self.map: torch.Tensor | None = None
        self.targets: PerExampleCache | None = None
        self.logits: PerExampleCache | None = None  # output_loss kl, cached
        self.teacher: Any = None
        self.vocab = 0
        self.phase = -1  # shallow_to_deep: index of the pair being trained; -1: all (joint)
        self._acts: dict[int, torch.Tensor] = {}
        self._capturing = False
        self._hooks: Any = None
        self._lora_params: dict[int, list[torch.nn.Parameter]] = {}
        self._info: dict[str, Any] = {}
        self._head: Any = None  # v2 fisher: (a layer, the final norm, the LM head) of the student

    @property
    def teacher_during_training(self) -> bool:
        return not self.spec.cache

    def _folder(self, ctx: MethodContext) -> Path:
        return Path(self.spec.cache_dir) if self.spec.cache_dir else ctx.workdir / "semalign_cache"

    @classmethod
    def shared_work(cls, recipe: Any, shared_root: Path) -> SharedWork:
        """Semantic bases, maps and targets are keyed by what they depend on: one folder serves every cell."""
        work = SharedWork.cache(recipe, "cache_dir", shared_root / "semalign")
        if recipe.method.output_loss == "kl":  # the same file as KD's cells of the grid
            work = SharedWork.cache(work.recipe, "logits_cache", shared_root / "kd-logits")
        return work

    def prepare(self, ctx: MethodContext) -> Any:
        from peft import get_peft_model

        spec, student = self.spec, ctx.student
        lora = (
            ctx.recipe.lora
            if spec.target_modules is None
            else ctx.recipe.lora.model_copy(update={"target_modules": list(spec.target_modules)})
        )
        check_targets(student.model, lora, student.arch, ctx.progress.warn)
        teacher = ctx.load_teacher()
        check_pair(teacher.arch, student.arch, teacher.tokenizer, student.tokenizer, self.name, padded_vocab=True)
        if teacher.arch.n_layers < 2:
            raise IncompatiblePairError(
                "semalign: the teacher has a single layer; the pairing rule needs two or more", hint="use a deeper teacher"
            )
        self.vocab = min(student.arch.vocab_size, teacher.arch.vocab_size, len(student.tokenizer))
        out = ctx.workdir / "semalign"
        out.mkdir(parents=True, exist_ok=True)
        t_arch, s_arch = teacher.arch, student.arch

        # 1. attribution over the seed split (the teacher sees the same token ids as the student)
        seed_items = ctx.task.split("seed")[: spec.n_seed]
        if not seed_items:
            raise DataError(
                f"semalign: task '{ctx.task.name}' has an empty seed split",
                hint="the attribution needs a few task examples (method.n_seed)",
            )
        seed_examples = encode_items(
            ctx.formatter, seed_items, ctx.recipe.training.max_length, f"task '{ctx.task.name}' seed split"
        )
        t0 = time.perf_counter()
        scores = layer_attribution(
            teacher.model,
            t_arch.layers_path,
            t_arch.n_layers,
            seed_examples,
            batch_size=spec.attribution_batch_size or ctx.recipe.training.batch_size,
            progress=ctx.progress,
        )
        attribution_s = time.perf_counter() - t0
        ctx.teacher_work.add(
            f"layer attribution: {len(seed_examples)} seed samples, forward + backward",
            forward_tokens=n_tokens(seed_examples),
            backward_tokens=n_tokens(seed_examples),
            seconds=attribution_s,
            parameters=t_arch.n_parameters,
        )

        # 2. critical layers and pairs
        ranked = [abs(s) for s in scores] if spec.rank_by == "abs" else scores
        if spec.version == "v2":  # exactly one source layer per target layer, in depth order
            critical = one_source_per_target(ranked, t_arch.n_layers, s_arch.n_layers)
            self.pairs = [
                LayerPair(k, grid_layer(t_arch.n_layers, s_arch.n_layers, k), j, j, 0.0, (j,))
                for k, j in enumerate(critical, start=1)
            ]
        else:
            if spec.critical_layers == "all":
                critical = [max(1, (t_arch.n_layers * k) // s_arch.n_layers) for k in range(1, s_arch.n_layers + 1)]
            else:
                critical = top_layers(ranked, min(spec.critical_layers, t_arch.n_layers))
            self.pairs = layer_pairs(critical, t_arch.n_layers, s_arch.n_layers)
        write_json(
            out / "attribution.json",
            {
                "method": "layer gradient x activation, sum over tokens and channels, mean over samples",
                "n_samples": len(seed_examples),
                "scores": scores,
                "rank_by": spec.rank_by,
                "critical_layers": critical,
                "seconds": round(attribution_s, 2),
            },
        )
        from pktransfer.plots import plot_layer_scores

        plot_layer_scores(
            scores,
            critical,
            out / "attribution.png",
            ylabel="gradient x activation",
            title=f"teacher layer attribution ({len(seed_examples)} seed samples)",
        )

        # 3. semantic bases -> the pair's recomposition map
        folder = self._folder(ctx)
        self.map, map_info = pair_map(
            lm_head(teacher, self.vocab),
            lm_head(student, self.vocab),
            folder,
            spec.basis_chunk,
            ctx.progress,
            spec.decomposition,
        )

        # 4. teacher targets for every training example (or live during training)
        t0 = time.perf_counter()
        if spec.cache:
            settings = json.dumps(
                {
                    "pairs": [p.to_dict() for p in self.pairs],
                    "point": spec.point,
                    "map": [map_info["teacher_head"], map_info["student_head"]],
                    "decomposition": spec.decomposition,
                    **(
                        {"version": "v2", "objective": spec.layer_objective, "positions": spec.relation_positions}
                        if spec.version == "v2"
                        else {}
                    ),
                },
                sort_keys=True,
            )
            key = cache_key(
                teacher_identity(ctx.recipe, student.tokenizer),
                settings,
                ctx.examples,
            )

            def compute() -> dict[str, torch.Tensor]:
                t1 = time.perf_counter()
                batch_size = ctx.recipe.training.batch_size
                if spec.version == "v2":
                    out = precompute_targets_v2(
                        teacher,
                        self.pairs,
                        self.map,
                        ctx.examples,
                        batch_size,
                        spec.layer_objective,
                        spec.relation_positions,
                        ctx.progress,
                    )
                else:
                    out = precompute_targets(teacher, self.pairs, spec.point, self.map, ctx.examples, batch_size, ctx.progress)
                ctx.teacher_work.add(
                    f"targets for {len(ctx.examples)} training examples (forward up to the deepest "
                    "paired layer; FLOPs counted as a full forward, an upper bound)",
                    forward_tokens=n_tokens(ctx.examples),
                    seconds=time.perf_counter() - t1,
                    parameters=t_arch.n_parameters,
                )
                return out

            prefix = "semalign-targets" if spec.version == "v1" else "semalign-v2-targets"
            path = cached_file(folder, prefix, key, compute, ctx.progress, ctx.teacher_work)
            self.targets = PerExampleCache(path, len(ctx.examples), "semalign")
        else:
            self.teacher = teacher
        if spec.output_loss == "kl" and spec.cache:
            logits_folder = Path(spec.logits_cache) if spec.logits_cache else folder
            self.logits = teacher_logits_cache(ctx, logits_folder, spec.top_k, lambda: (teacher, self.vocab))
        targets_s = time.perf_counter() - t0

        # 5. LoRA on the paired layers, and hooks on the supervised sublayers
        config = lora_config(lora, s_arch)
        if spec.lora_layers == "paired":
            config.layers_to_transform = [p.student - 1 for p in self.pairs]
        model = get_peft_model(student.model, config)
        base = model.base_model.model
        modules = {p.student: sublayer(base, s_arch, p.student - 1, spec.point) for p in self.pairs}
        if spec.version == "v2":  # the frontier layer's input and output (its residual contribution)
            active = lambda key: self._capturing and key in {p.student for p in self.active_pairs()}  # noqa: E731
            self._hooks = capture_residuals(modules, self._acts, when=active)
            self._head = (base.get_submodule(s_arch.final_norm_module), base.get_output_embeddings())
        else:
            self._hooks = capture(modules, self._acts, when=lambda: self._capturing)
        self._hooks.__enter__()
        self._capturing = True
        prefix = f"{s_arch.layers_path}."
        for name, param in model.named_parameters():
            if param.requires_grad and prefix in name:
                layer = int(name.split(prefix, 1)[1].split(".", 1)[0])
                self._lora_params.setdefault(layer, []).append(param)
        self._info = {
            **({"version": "v2", "layer_objective": spec.layer_objective} if spec.version == "v2" else {}),
            "critical_teacher_layers": critical,
            "pairs": [p.to_dict() for p in self.pairs],
            "point": spec.point,
            "schedule": spec.schedule,
            "lora_layers": spec.lora_layers,
            "target_modules": list(lora.target_modules),
            "map": map_info,
            "seconds": {"attribution": round(attribution_s, 2), "map": map_info["seconds"], "targets": round(targets_s, 2)},
        }
        write_json(out / "semalign.json", self._info)
        ctx.progress.log(
            "semalign: "
            + ", ".join(
                f"student {p.student} <- teacher {p.a}" + (f"/{p.b} (λ={p.weight_b:.2f})" if p.weight_b else "")
                for p in self.pairs
            )
            + f" (critical teacher layers {critical})"
        )
        return model

    # -- training ---------------------------------------------------------------------------------

    def active_pairs(self) -> list[LayerPair]:
        return self.pairs if self.phase < 0 else [self.pairs[self.phase]]

    def set_phase(self, phase: int) -> None:
        """shallow_to_deep: supervise pair ``phase`` only and update only its layer's LoRA."""
        self.phase = phase
        layer = self.pairs[phase].student - 1
        for i, params in self._lora_params.items():
            for p in params:
                p.requires_grad_(i == layer)

    def training_loss(self, ctx: MethodContext) -> LossFn:
        spec = self.spec
        if spec.version == "v2":
            return self._loss_v2(ctx)

        def loss(outputs: Any, batch: dict[str, torch.Tensor], n_tokens: Any) -> torch.Tensor:
            labels = batch["labels"]
            mask = response_positions(labels).to(outputs.logits.device)
            n = mask.sum() if n_tokens is None else n_tokens
            pairs = self.active_pairs()
            acts = [self._acts[p.student][:, :-1][mask] for p in pairs]
            if self.targets is not None:
                index = batch["index"].tolist()
                targets = [self.targets.rows(f"pair.{p.student}", index).float() for p in pairs]
            else:
                t0 = time.perf_counter()
                targets = teacher_targets(
                    self.teacher,
                    pairs,
                    spec.point,
                    self.map,
                    batch["input_ids"],
                    batch["attention_mask"],
                    labels,
                )
                ctx.teacher_work.add(
                    "live targets at every training batch (forward up to the deepest paired layer)",
                    forward_tokens=int(batch["attention_mask"].sum()),
                    seconds=time.perf_counter() - t0,
                    parameters=self.teacher.arch.n_parameters,
                )
            # the logits that predict response tokens, in mask order: computed at those positions only (the LM head,
            # [V = 152k] per position, runs where the loss reads; ``response_logits`` below) or picked from all
            logits = response_rows(outputs.logits, labels, batch.get("logits_positions"))[0][..., : self.vocab]
            act, logit = alignment_terms(acts, targets, logits, batch["input_ids"][:, 1:].to(mask.device)[mask])
            if spec.output_loss == "kl":
                t_vals, t_ids = self._teacher_logits(ctx, batch, mask.device)
                logit = spec.temperature**2 * kl_to_teacher(logits, t_vals, spec.temperature, t_ids).sum()
            self._acts.clear()
            return (spec.activation_weight * act + spec.logit_weight * logit) / n

        loss.response_logits = True  # type: ignore[attr-defined]
        return loss

    def _loss_v2(self, ctx: MethodContext) -> LossFn:
        """v2: the frontier layer's objective (relation geometry of its residual contribution, or the Fisher quadratic
        on aligned logits) plus output KL. Each example's relation term is weighted by its response tokens, so the
        sum over a batch divided by the token count is a token-weighted mean, as every other loss here."""
        spec = self.spec

        def loss(outputs: Any, batch: dict[str, torch.Tensor], n_tokens: Any) -> torch.Tensor:
            labels = batch["labels"]
            device = outputs.logits.device
            mask = response_positions(labels).to(device)
            n = mask.sum() if n_tokens is None else n_tokens
            pairs = self.active_pairs()
            index = batch["index"].tolist()
            live = None
            if self.targets is None:
                t0 = time.perf_counter()
                live = teacher_targets_v2(self.teacher, pairs, self.map, batch, spec.layer_objective, spec.relation_positions)
                ctx.teacher_work.add(
                    "live v2 targets at every training batch (forward up to the deepest source layer)",
                    forward_tokens=int(batch["attention_mask"].sum()),
                    seconds=time.perf_counter() - t0,
                    parameters=self.teacher.arch.n_parameters,
                )
            layer = torch.zeros((), device=device)
            for k, p in enumerate(pairs):
                h_in, h_out = self._acts[p.student]

                def target(b: int, k: int = k, p: LayerPair = p) -> torch.Tensor:
                    return live[k][b] if live is not None else self.targets.rows(f"pair.{p.student}", [index[b]])  # type: ignore[union-attr]

                if spec.layer_objective == "relation":
                    keep = v2_positions(batch, spec.relation_positions).to(device)
                    residual = h_out - h_in
                    weight = mask.sum(1)
                    for b in range(residual.shape[0]):
                        t = int(keep[b].sum())
                        gram = target(b).float().reshape(t, t)
                        layer = layer + weight[b] * relation_distance(residual[b][keep[b]], gram)
                else:
                    norm, head = self._head
                    w = head.weight[: self.vocab]
                    z_s = torch.nn.functional.linear(norm(h_out[:, :-1][mask]).float(), w.float())
                    aligned = torch.cat([target(b) for b in range(h_out.shape[0])]).to(device)
                    with torch.no_grad():
                        z_t = torch.nn.functional.linear(norm(aligned.to(h_out.dtype)).float(), w.float())
                    layer = layer + fisher_quadratic(z_s, z_t).sum()
            logits = response_rows(outputs.logits, labels, batch.get("logits_positions"))[0][..., : self.vocab]
            t_vals, t_ids = self._teacher_logits(ctx, batch, device)
            logit = spec.temperature**2 * kl_to_teacher(logits, t_vals, spec.temperature, t_ids).sum()
            self._acts.clear()
            return (spec.activation_weight * layer / max(1, len(pairs)) + spec.logit_weight * logit) / n

        loss.response_logits = True  # type: ignore[attr-defined]
        return loss

    def _teacher_logits(
        self, ctx: MethodContext, batch: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """output_loss kl: the teacher's (top-k) logits and their ids at the batch's response positions, in the order
        of :func:`response_rows` (live: the teacher's LM head runs at the positions the student's logits were
        computed at, ``batch["logits_positions"]``, or at every position without them)."""
        if self.logits is not None:
            index = batch["index"].tolist()
            return self.logits.rows("values", index).to(device), self.logits.rows("ids", index).to(device)
        keep = batch.get("logits_positions")
        what = "live teacher logits at every training batch (output_loss kl)"
        with torch.no_grad():
            out = live_teacher(ctx, self.teacher, batch, what, **({} if keep is None else {"logits_to_keep": keep}))
        rows, _ = response_rows(out.logits[..., : self.vocab], batch["labels"], keep)
        return rows.to(device), None

    def callbacks(self, ctx: MethodContext) -> list[Any]:
        if self.spec.schedule != "shallow_to_deep" or len(self.pairs) < 2:
            return []
        from transformers import TrainerCallback

        method = self

        class ShallowToDeep(TrainerCallback):
            """Equal shares of the steps per pair, shallow first (resumes into the right phase)."""

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                phase = min(len(method.pairs) - 1, state.global_step * len(method.pairs) // max(1, state.max_steps))
                if phase != method.phase:
                    method.set_phase(phase)

        return [ShallowToDeep()]

    def finish_training(self) -> None:
        self._capturing = False
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        self._acts.clear()
        for params in self._lora_params.values():
            for p in params:
                p.requires_grad_(True)
        self.phase = -1
        self.teacher = None
        self.targets = None
        self.logits = None

    def report(self) -> dict[str, Any]:
        return self._info
