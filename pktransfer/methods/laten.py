"""LaTen (Tan et al., "Neural Incompatibility", ACL 2025), "PrePKT": locate, align, inject, no post-training.

Reads like methods.md §2:

1. Locate (``ops.neurons``), in teacher and student alike, on the last answer token y of each extract
   sample, through the logit lens log p(y | h) = log_softmax(lm_head(final_norm(h)))[y]:
   - layer scores for attention and FFN: log p(y | h + out_l) − log p(y | h), h the residual before
     the sublayer;
   - neuron scores: FFN neuron i adds m_i·W_down[:, i], attention neuron (head, head-dim) j adds
     a_j·W_o[:, j] (a: attention output before o_proj).
   The top L_S teacher layers (attention and FFN separately) are paired in order with the student's
   layers; in each pair the top ``transfer_rate`` of the student's neuron count is kept in both
   models, the i-th best teacher neuron feeding the i-th best student neuron.
2. Extract the teacher's up_proj rows and down_proj columns of the located FFN neurons, v_proj rows and
   o_proj columns of the located attention neurons (v rows through the grouped kv head).
3. Align: one hypernetwork per module type, shared across layers, on the hidden axis D_T -> D_S:
   Linear(D_T, D_T) -> ReLU -> Linear(D_T, D_S), no bias, weights N(0, init_std).
4. Inject: add the mapped vectors at the student's own located rows/columns (forward hooks while
   training, so no dense delta is ever formed; merged into the weights at the end).
5. Train only the hypernetworks: CE of the injected student on (one extract example + 15 align
   examples) + penalty · Σ mean(Δ²), AdamW (wd 0.05, betas 0.9/0.95), one-cycle cosine schedule with
   10% warmup, a few steps; a checkpoint per step. The step kept is the one with the lowest cross
   entropy on the held-out end of the align split (``n_val`` items, never in a training batch); the
   test split is never looked at.

The saved student is the original plus the injected delta, merged (the official code saves the
unmodified student); ``laten/delta.safetensors`` holds the delta's indices and values.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from pktransfer.data import Example, encode_items
from pktransfer.errors import DataError, IncompatiblePairError, RecipeError
from pktransfer.fileio import save_safetensors, torch_save, write_json
from pktransfer.methods.base import Method, MethodContext
from pktransfer.models.arch import ArchitectureDescription
from pktransfer.models.pair import check_pair
from pktransfer.ops.neurons import candidate_vocab, kv_rows, neuron_scores, restrict, sublayer_score, top_indices
from pktransfer.ops.semantic import top_layers
from pktransfer.progress import Progress
from pktransfer.training import causal_lm_loss_sum, collate_examples

ROLES = ("up", "down", "v", "o")

# ---- 1. locate --------------------------------------------------------------------------------------


def answer_position(example: Example, eos_ids: set[int]) -> tuple[int, int]:
    """(position whose logits predict y, y): y is the last response token that is not an end token."""
    resp = [i for i, lab in enumerate(example.labels) if lab != -100 and example.input_ids[i] not in eos_ids]
    if not resp:
        resp = [i for i, lab in enumerate(example.labels) if lab != -100]
    t = resp[-1]
    return t - 1, example.input_ids[t]


@torch.no_grad()
def locate_scores(loaded: Any, examples: list[Example], *, vocab_k: int | None, progress: Progress,
                  what: str) -> dict[str, torch.Tensor]:
    """Scores summed over samples: ``attn_layer`` [L], ``ffn_layer`` [L], ``attn`` [L, H·hd], ``ffn`` [L, F]."""
    model, arch = loaded.model, loaded.arch
    device = next(model.parameters()).device
    norm = model.get_submodule(arch.final_norm_module)
    head_w = model.get_output_embeddings().weight.detach()
    eos = {i for i in (loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id) if i is not None}
    n_layers = arch.n_layers
    seen: dict[str, Any] = {}
    handles = []
    for i in range(n_layers):
        block = model.get_submodule(f"{arch.layers_path}.{i}")

        def pre(key: str) -> Any:
            def hook(mod: Any, args: Any, kwargs: Any) -> None:
                seen[key] = args[0] if args else kwargs["hidden_states"]
            return hook

        def post(key: str) -> Any:
            def hook(mod: Any, args: Any, out: Any) -> None:
                seen[key] = out[0] if isinstance(out, tuple) else out
            return hook

        handles += [block.register_forward_pre_hook(pre(f"in{i}"), with_kwargs=True),
                    block.self_attn.register_forward_hook(post(f"attn{i}")),
                    block.self_attn.o_proj.register_forward_pre_hook(pre(f"o{i}"), with_kwargs=True),
                    block.mlp.down_proj.register_forward_pre_hook(pre(f"down{i}"), with_kwargs=True),
                    block.mlp.register_forward_hook(post(f"mlp{i}"))]
    f_size, a_size = arch.intermediate_size, arch.n_heads * arch.head_dim
    out = {"attn_layer": torch.zeros(n_layers, dtype=torch.float64), "ffn_layer": torch.zeros(n_layers, dtype=torch.float64),
           "attn": torch.zeros(n_layers, a_size, dtype=torch.float64),
           "ffn": torch.zeros(n_layers, f_size, dtype=torch.float64)}
    try:
        with progress.task(f"laten: locate in the {what}", total=len(examples)) as advance:
            for e in examples:
                pos, y = answer_position(e, eos)
                model(input_ids=torch.tensor([e.input_ids[: pos + 1]], device=device))
                for i in range(n_layers):
                    h_in = seen[f"in{i}"][0, pos].float()
                    attn = seen[f"attn{i}"][0, pos].float()
                    h_mid = h_in + attn
                    vocab = candidate_vocab([h_in, h_mid], norm, head_w, y, vocab_k)
                    head, yi = restrict(head_w, y, vocab)
                    layer = model.get_submodule(f"{arch.layers_path}.{i}")
                    out["attn_layer"][i] += sublayer_score(h_in, attn, norm, head, yi)
                    out["ffn_layer"][i] += sublayer_score(h_mid, seen[f"mlp{i}"][0, pos].float(), norm, head, yi)
                    out["ffn"][i] += neuron_scores(h_mid, seen[f"down{i}"][0, pos], layer.mlp.down_proj.weight.T,
                                                   norm, head, yi).double().cpu()
                    out["attn"][i] += neuron_scores(h_in, seen[f"o{i}"][0, pos], layer.self_attn.o_proj.weight.T,
                                                    norm, head, yi).double().cpu()
                seen.clear()
                advance(1)
    finally:
        for h in handles:
            h.remove()
    return {k: v / max(1, len(examples)) for k, v in out.items()}


def plan_transfer(t_scores: dict[str, torch.Tensor], s_scores: dict[str, torch.Tensor], t_arch: ArchitectureDescription,
                  s_arch: ArchitectureDescription, rate: float) -> dict[str, Any]:
    """Which teacher layer and neurons feed which student layer and neurons.

    Returns per role family (``ffn``, ``attn``): ``teacher_layers`` [L_S] (0-based, in order) and per student
    layer k the teacher / student neuron indices, paired by rank.
    """
    plan: dict[str, Any] = {}
    for fam, size_s, size_t in (("ffn", s_arch.intermediate_size, t_arch.intermediate_size),
                                ("attn", s_arch.n_heads * s_arch.head_dim, t_arch.n_heads * t_arch.head_dim)):
        n = max(1, round(rate * size_s))
        if n > size_t:
            raise IncompatiblePairError(f"laten: {n} {fam} neurons per layer asked for, the teacher has {size_t}",
                                        hint="lower method.transfer_rate")
        layers = [i - 1 for i in top_layers(t_scores[f"{fam}_layer"].tolist(), s_arch.n_layers)]
        plan[fam] = {"teacher_layers": layers, "n": n,
                     "teacher": [top_indices(t_scores[fam][t], n) for t in layers],
                     "student": [top_indices(s_scores[fam][k], n) for k in range(s_arch.n_layers)]}
    return plan


# ---- 2. extract ---------------------------------------------------------------------------------------


def extract(teacher: Any, plan: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """Per role, per student layer, the teacher vectors on its hidden axis [n, D_T] (float32, CPU)."""
    arch: ArchitectureDescription = teacher.arch
    get = teacher.model.get_submodule
    out: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}
    for k, t in enumerate(plan["ffn"]["teacher_layers"]):
        idx = plan["ffn"]["teacher"][k]
        out["up"].append(get(arch.module_name(t, "up")).weight.detach()[idx.to(teacher.device)].float().cpu())
        out["down"].append(get(arch.module_name(t, "down")).weight.detach()[:, idx.to(teacher.device)].T.float().cpu())
    for k, t in enumerate(plan["attn"]["teacher_layers"]):
        pos = plan["attn"]["teacher"][k]
        rows = kv_rows(pos, arch.n_heads, arch.n_kv_heads, arch.head_dim)
        out["v"].append(get(arch.module_name(t, "v")).weight.detach()[rows.to(teacher.device)].float().cpu())
        out["o"].append(get(arch.module_name(t, "o")).weight.detach()[:, pos.to(teacher.device)].T.float().cpu())
    return out


# ---- 3. align -----------------------------------------------------------------------------------------


class HyperNet(torch.nn.Module):
    """Linear(D_T -> D_T) -> ReLU -> Linear(D_T -> D_S), no bias, weights drawn from N(0, init_std²)."""

    def __init__(self, d_teacher: int, d_student: int, init_std: float = 1e-5) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d_teacher, d_teacher, bias=False), torch.nn.ReLU(),
                                       torch.nn.Linear(d_teacher, d_student, bias=False))
        for layer in (self.net[0], self.net[2]):
            torch.nn.init.normal_(layer.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---- 4. inject ----------------------------------------------------------------------------------------


class Injection:
    """Where the mapped vectors go in the student: per role and layer, the module and its row/column indices.

    up: rows of up_proj; down: columns of down_proj; v: rows of v_proj; o: columns of o_proj. A student v row
    shared by several located attention positions (grouped kv heads) receives only the best-ranked pair's.
    """

    AXIS: ClassVar[dict[str, str]] = {"up": "rows", "down": "cols", "v": "rows", "o": "cols"}

    def __init__(self, student: Any, plan: dict[str, Any]) -> None:
        arch: ArchitectureDescription = student.arch
        self.modules: dict[str, list[str]] = {r: [] for r in ROLES}
        self.index: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}
        self.keep: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}  # which extracted vectors are used
        for k in range(arch.n_layers):
            idx = plan["ffn"]["student"][k]
            for role in ("up", "down"):
                self.modules[role].append(arch.module_name(k, role))
                self.index[role].append(idx)
                self.keep[role].append(torch.arange(len(idx)))
            pos = plan["attn"]["student"][k]
            rows = kv_rows(pos, arch.n_heads, arch.n_kv_heads, arch.head_dim)
            keep: list[int] = []  # the first (best-ranked) located position of each distinct kv row
            seen: set[int] = set()
            for i, r in enumerate(rows.tolist()):
                if r not in seen:
                    seen.add(r)
                    keep.append(i)
            first = torch.tensor(keep, dtype=torch.long)
            self.modules["v"].append(arch.module_name(k, "v"))
            self.index["v"].append(rows[first])
            self.keep["v"].append(first)
            self.modules["o"].append(arch.module_name(k, "o"))
            self.index["o"].append(pos)
            self.keep["o"].append(torch.arange(len(pos)))

    def hooks(self, model: Any, deltas: dict[str, list[torch.Tensor]]) -> list[Any]:
        """Forward hooks adding x·Δᵀ for the current ``deltas`` (read at call time), without a dense Δ."""
        handles = []
        for role in ROLES:
            for k, name in enumerate(self.modules[role]):
                handles.append(model.get_submodule(name).register_forward_hook(self._hook(role, k, deltas)))
        return handles

    def _hook(self, role: str, k: int, deltas: dict[str, list[torch.Tensor]]) -> Any:
        idx = self.index[role][k]

        def hook(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            x, d = args[0], deltas[role][k]
            i = idx.to(out.device)
            if self.AXIS[role] == "rows":  # Δ[idx] = d: output channels idx gain x·dᵀ
                return out.index_add(-1, i, (x @ d.to(x.dtype).T).to(out.dtype))
            return out + (x[..., i] @ d.to(x.dtype)).to(out.dtype)  # Δ[:, idx] = dᵀ

        return hook

    @torch.no_grad()
    def merge(self, model: Any, deltas: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Add the deltas into the weights; return them as tensors (``MODULE::rows|cols`` and ``MODULE::values``)."""
        saved = {}
        for role in ROLES:
            for k, name in enumerate(self.modules[role]):
                w = model.get_submodule(name).weight
                idx, d = self.index[role][k].to(w.device), deltas[role][k].detach().to(w.device, w.dtype)
                if self.AXIS[role] == "rows":
                    w[idx] += d
                else:
                    w[:, idx] += d.T
                saved[f"{name}::{self.AXIS[role]}"] = idx.cpu().clone()  # up and down share their indices
                saved[f"{name}::values"] = d.cpu().contiguous()
        return saved


def mapped_deltas(hyper: dict[str, HyperNet], vectors: dict[str, list[torch.Tensor]], injection: Injection,
                  device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Every layer's extracted teacher vectors through its role's hypernetwork (one call per role) -> [n, D_S]."""
    out: dict[str, list[torch.Tensor]] = {}
    for role in ROLES:
        used = [v[keep] for v, keep in zip(vectors[role], injection.keep[role], strict=True)]
        mapped = hyper[role](torch.cat(used).to(device))
        out[role] = list(mapped.split([len(u) for u in used]))
    return out


def delta_penalty(deltas: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """Σ over modules of MSE(Δ, 0) on the injected block."""
    return torch.stack([d.pow(2).mean() for ds in deltas.values() for d in ds]).sum()


# ---- 5. train -------------------------------------------------------------------------------------------


def mean_ce(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    labels = batch["labels"].to(device)
    return causal_lm_loss_sum(out.logits, labels) / (labels[:, 1:] != -100).sum().clamp_min(1)


def step_batch(step: int, extract: list[Example], align: list[Example], partners: int, seed: int) -> list[Example]:
    """Step s: extract example s mod n, plus ``partners`` align examples drawn with (seed, s): resumable."""
    rng = random.Random(seed * 100_003 + step)
    return [extract[step % len(extract)], *rng.sample(align, min(partners, len(align)))]


def save_hypernets(hyper: dict[str, HyperNet], folder: Path) -> None:
    """``folder/hyper.safetensors``: every role's weights under ``ROLE.``."""
    save_safetensors({f"{r}.{k}": v.detach().cpu() for r, h in hyper.items() for k, v in h.state_dict().items()},
                     folder / "hyper.safetensors")


def load_hypernets(hyper: dict[str, HyperNet], folder: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "hyper.safetensors"))
    for r, h in hyper.items():
        h.load_state_dict({k[len(r) + 1:]: v.to(device) for k, v in weights.items() if k.startswith(r + ".")})


def choose_step(val_losses: dict[int, float]) -> int:
    """The documented rule: the step with the lowest validation CE on the held-out align items; ties go to
    the earlier step. Step 0 (the untrained hypernetworks) is not a candidate."""
    candidates = {s: v for s, v in val_losses.items() if s > 0}
    return min(candidates, key=lambda s: (candidates[s], s))


class LatenMethod(Method):
    name = "laten"
    needs_teacher = True
    post_training = False

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._info: dict[str, Any] = {}
        self.training: dict[str, Any] = {}

    def prepare(self, ctx: MethodContext) -> Any:
        spec, recipe, student = self.spec, ctx.recipe, ctx.student
        out = ctx.workdir / "laten"
        out.mkdir(parents=True, exist_ok=True)
        extract_ex, align_ex, val_ex = self._splits(ctx)
        teacher = ctx.load_teacher()
        check_pair(teacher.arch, student.arch, teacher.tokenizer, student.tokenizer, self.name)
        t0 = time.perf_counter()
        plan, located_from = self._locate(ctx, teacher, extract_ex, out)
        locate_s = time.perf_counter() - t0
        vectors = extract(teacher, plan)
        teacher.unload()  # the teacher is not needed past this point: only the extracted vectors are
        device = student.device
        torch.manual_seed(recipe.seed)
        d_t, d_s = teacher.arch.hidden_size, student.arch.hidden_size
        hyper = {r: HyperNet(d_t, d_s, spec.init_std).to(device) for r in ROLES}
        injection = Injection(student, plan)
        for p in student.model.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        best, history, resumed = self._train(ctx, hyper, vectors, injection, extract_ex, align_ex, val_ex, out)
        train_s = time.perf_counter() - t0
        with torch.no_grad():
            deltas = mapped_deltas(hyper, vectors, injection, device)
        saved = injection.merge(student.model, deltas)
        save_safetensors(saved, out / "delta.safetensors")
        norms = {r: float(torch.cat([d.flatten() for d in deltas[r]]).norm()) for r in ROLES}
        self.training = {"steps": best, "seconds": round(train_s, 2), "resumed_from": resumed,
                         "final_loss": next((h["loss"] for h in history if h["step"] == best), None),
                         "log_history": history}
        self._info = {"located_from": located_from, "locate_seconds": round(locate_s, 2),
                      "teacher_layers": {f: plan[f]["teacher_layers"] for f in ("ffn", "attn")},
                      "neurons_per_layer": {f: plan[f]["n"] for f in ("ffn", "attn")},
                      "steps_trained": spec.steps, "chosen_step": best,
                      "choice_rule": "lowest cross entropy on the held-out align items (ties: earlier step)",
                      "val_loss": {h["step"]: h["val_loss"] for h in history},
                      "delta_norm": norms, "n_extract": len(extract_ex), "n_align": len(align_ex), "n_val": len(val_ex)}
        write_json(out / "laten.json", self._info)
        ctx.progress.log(f"laten: kept step {best} of {spec.steps} (val CE "
                         f"{self._info['val_loss'][best]:.4f}, untrained {self._info['val_loss'][0]:.4f}); "
                         f"|Δ| {', '.join(f'{r} {v:.3g}' for r, v in norms.items())}")
        return student.model

    def _splits(self, ctx: MethodContext) -> tuple[list[Example], list[Example], list[Example]]:
        spec, task = self.spec, ctx.task
        max_len = ctx.recipe.training.max_length
        ext = task.split("extract")[: spec.n_extract]
        align = task.split("align")
        if not ext:
            raise DataError(f"laten: task '{task.name}' has an empty extract split",
                            hint="LaTen locates neurons on the extract split; pick a task that has one")
        if len(align) <= spec.n_val:
            raise DataError(f"laten: the align split of task '{task.name}' has {len(align)} items, but "
                            f"method.n_val={spec.n_val} are held out for choosing the step",
                            hint="lower method.n_val or use a larger align split")
        enc = ctx.formatter
        return (encode_items(enc, ext, max_len, f"task '{task.name}' extract split"),
                encode_items(enc, align[: len(align) - spec.n_val], max_len, f"task '{task.name}' align split"),
                encode_items(enc, align[len(align) - spec.n_val:], max_len, f"task '{task.name}' align split (val)"))

    def _locate(self, ctx: MethodContext, teacher: Any, examples: list[Example],
                out: Path) -> tuple[dict[str, Any], str]:
        from safetensors.torch import load_file

        spec, student = self.spec, ctx.student
        path, meta = out / "located.safetensors", out / "located.json"
        key = {"teacher": ctx.recipe.teacher.model_dump(), "student": ctx.recipe.student.model_dump(),
               "n_extract": len(examples), "locate_vocab": spec.locate_vocab,
               "ids": [e.input_ids for e in examples]}
        if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:  # a resumed run
            scores = load_file(str(path))
            t_scores = {k[2:]: v for k, v in scores.items() if k.startswith("t.")}
            s_scores = {k[2:]: v for k, v in scores.items() if k.startswith("s.")}
            source = "reused"
        else:
            t_scores = locate_scores(teacher, examples, vocab_k=spec.locate_vocab, progress=ctx.progress,
                                     what="teacher")
            s_scores = locate_scores(student, examples, vocab_k=spec.locate_vocab, progress=ctx.progress,
                                     what="student")
            save_safetensors({**{f"t.{k}": v for k, v in t_scores.items()}, **{f"s.{k}": v for k, v in s_scores.items()}},
                             path)
            write_json(meta, key, indent=None)  # after the scores: the key vouches for a whole file
            source = "computed"
        return plan_transfer(t_scores, s_scores, teacher.arch, student.arch, spec.transfer_rate), source

    def _train(self, ctx: MethodContext, hyper: dict[str, HyperNet], vectors: dict[str, list[torch.Tensor]],
               injection: Injection, extract_ex: list[Example], align_ex: list[Example], val_ex: list[Example],
               out: Path) -> tuple[int, list[dict[str, Any]], str | None]:

        spec, recipe, student = self.spec, ctx.recipe, ctx.student
        device, pad = student.device, student.tokenizer.pad_token_id
        params = [p for h in hyper.values() for p in h.parameters()]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps,
                                                    pct_start=spec.warmup_ratio, anneal_strategy="cos")
        steps_dir = out / "steps"
        live: dict[str, list[torch.Tensor]] = {}
        handles = injection.hooks(student.model, live)
        model = student.model

        def validate() -> float:
            with torch.no_grad():
                live.update(mapped_deltas(hyper, vectors, injection, device))
                total, n = 0.0, 0
                for r in range(0, len(val_ex), 8):
                    b = collate_examples(val_ex[r:r + 8], pad)
                    out_ = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
                    labels = b["labels"].to(device)
                    total += float(causal_lm_loss_sum(out_.logits, labels))
                    n += int((labels[:, 1:] != -100).sum())
                return total / max(1, n)

        def state(step: int) -> Path:
            return steps_dir / f"step-{step}"

        history: list[dict[str, Any]] = []
        start, resumed = 0, None
        done = sorted(int(p.name.split("-")[1]) for p in steps_dir.glob("step-*") if (p / "done").is_file()) \
            if steps_dir.is_dir() else []
        try:
            model.eval()  # no dropout in the frozen student; only the hypernetworks learn
            if done:
                last = done[-1]
                load_hypernets(hyper, state(last), device)
                saved = torch.load(state(last) / "optim.pt", weights_only=False)
                opt.load_state_dict(saved["optimizer"])
                sched.load_state_dict(saved["scheduler"])
                history = saved["history"]
                start, resumed = last, str(state(last))
                ctx.progress.log(f"laten: resuming after step {last}")
            else:
                history.append({"step": 0, "loss": None, "val_loss": validate()})
            with ctx.progress.task("laten: train the hypernetworks", total=spec.steps) as advance:
                advance(start)
                for step in range(start, spec.steps):
                    batch = collate_examples(step_batch(step, extract_ex, align_ex, spec.partners, recipe.seed), pad)
                    live.update(mapped_deltas(hyper, vectors, injection, device))
                    ce = mean_ce(model, batch, device)
                    penalty = delta_penalty(live)
                    loss = ce + spec.penalty * penalty
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    val = validate()
                    history.append({"step": step + 1, "loss": loss.item(), "ce": ce.item(), "penalty": penalty.item(),
                                    "val_loss": val, "lr": sched.get_last_lr()[0]})
                    folder = state(step + 1)
                    folder.mkdir(parents=True, exist_ok=True)
                    save_hypernets(hyper, folder)
                    torch_save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history},
                               folder / "optim.pt")
                    write_json(folder / "done", history[-1], indent=None)  # last: the step is complete
                    advance(1, loss=f"{history[-1]['loss']:.4f}", val=f"{val:.4f}")
        finally:
            for h in handles:
                h.remove()
        best = choose_step({h["step"]: h["val_loss"] for h in history})
        load_hypernets(hyper, state(best), device)
        return best, history, resumed

    def save_adapter(self, model: Any, folder: Path) -> None:
        raise RecipeError("laten saves a merged student, not an adapter", hint="read the run's merged/ folder")

    def report(self) -> dict[str, Any]:
        return self._info
