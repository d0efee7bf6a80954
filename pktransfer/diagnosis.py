"""``pkt diagnose``: measure, before any training, whether each method's premise holds for a pair.

On the recipe's pair and a few dozen items of the task's seed split, without training:

1. Representation similarity: minibatch linear CKA (``ops.similarity``) between every teacher layer's
   output and every student layer's output over the items' response tokens (and, for comparison, over
   every token, prompt and chat template included), with the layer pairings each method
   would use drawn on the heat map (Seeking's selected layers in order, SemAlign's grid and critical
   layers, LaTen's located layers).
2. Semantic-basis fidelity (SemAlign's premise), at the MLP outputs SemAlign supervises, on response
   positions: within each model, cos(recompose(decompose(h)), h) with its own bases (``paper_v1``: the
   paper's unit pseudo-inverse bases; ``dual``: W⁺W h, exact for a full-rank head); across the pair,
   cos(mapped teacher target, the student's own activation) at every student layer (the teacher layers
   interpolated as SemAlign pairs them), for paper_v1, dual, and a random Gaussian map of the same shape.
3. Sensitivity concentration (Seeking's premise): over ``backward_items`` seed items, the share of a
   weight's total sensitivity Σ|θ·∂L/∂θ| that Seeking's max-sum submatrix holds, against random and
   evenly spaced (weight selection's) submatrices of the same shape, per module role of the selected layers.
4. Parametric similarity: for Seeking, cos(vec(extracted teacher block), vec(the student weight it
   initialises a LoRA on)) per role, against random blocks; for LaTen, the located FFN neurons' down_proj
   columns, teacher (its residual axis cut to the student's width by evenly spaced indices, since LaTen's
   own mapping is a hypernetwork that does not exist before training) against the student's located
   neurons paired by rank, against randomly chosen student neurons.
5. A verdict table: each method's premise, the figure, what it predicts.

Everything is accumulated batch by batch (no activation dumps); the teacher's sensitivity holds one
per-element map per weight while it accumulates, as Seeking does.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pktransfer.data import IGNORE_INDEX, Example, PromptFormatter, Task, encode_items, recipe_formatter
from pktransfer.errors import DataError
from pktransfer.fileio import write_json, write_text
from pktransfer.methods.injection import group_roles
from pktransfer.methods.laten import answer_input
from pktransfer.methods.seeking import SeekingConfig, compute_sensitivity
from pktransfer.methods.semalign import (
    capture,
    head_fingerprint,
    head_pinv,
    layer_attribution,
    lm_head,
    pair_map,
    sublayer,
)
from pktransfer.methods.teacher_cache import cached_file
from pktransfer.models import LoadedModel
from pktransfer.models.arch import ATTENTION_ROLES, FFN_ROLES
from pktransfer.models.tying import parameter_key
from pktransfer.ops.location import locate_scores, mean_scores, plan_transfer
from pktransfer.ops.offload import stored_value
from pktransfer.ops.ranking import top_k
from pktransfer.ops.selection import max_sum_submatrix, select_layers, uniform_indices
from pktransfer.ops.semantic import (
    dual_map,
    interpolate,
    interpolation,
    layer_pairs,
    map_activations,
    recompose_map,
    top_layers,
)
from pktransfer.ops.similarity import MinibatchCKA
from pktransfer.progress import Progress
from pktransfer.training import collate_examples, response_positions


@dataclass
class DiagnoseSettings:
    items: int = 16  # seed items for CKA and fidelity (forward passes only)
    backward_items: int = 4  # seed items for the teacher's sensitivity and attribution (forward + backward)
    locate_items: int = 2  # items LaTen's location averages over
    locate_vocab: int | None = 256  # LaTen's restricted softmax (None: exact)
    critical_layers: int = 4  # SemAlign's default
    transfer_rate: float = 0.1  # LaTen's default
    random_draws: int = 8
    batch_size: int = 4
    cka_tokens: int = 256  # tokens pooled per CKA minibatch
    max_length: int = 256
    seed: int = 0


class _Mean:
    """Running sums of cosines per key (mean over positions)."""

    def __init__(self) -> None:
        self.sums: dict[Any, float] = {}
        self.counts: dict[Any, int] = {}

    def add(self, key: Any, a: torch.Tensor, b: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)
        self.sums[key] = self.sums.get(key, 0.0) + float(cos.sum())
        self.counts[key] = self.counts.get(key, 0) + int(cos.numel())

    def get(self, key: Any) -> float | None:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else None


def _items(task: Task, n: int, formatter: PromptFormatter, max_length: int) -> list[Example]:
    items = task.split("seed")[:n]
    if not items:
        raise DataError(f"diagnose: task '{task.name}' has an empty seed split", hint="the diagnosis reads a few seed items")
    return encode_items(formatter, items, max_length, f"task '{task.name}' seed split")


def _self_maps(head: torch.Tensor, folder: Path, chunk: int, progress: Progress) -> dict[str, torch.Tensor]:
    """A model's own round trip maps: paper_v1 S_Sᵀ S_S and dual W⁺W (cached by the head's fingerprint)."""
    from safetensors.torch import load_file

    fp = head_fingerprint(head)

    def compute() -> dict[str, torch.Tensor]:
        g = head_pinv(head, folder, chunk, progress, fp)  # the factor pair_map already cached
        return {"paper_v1": recompose_map(head, head, chunk, g, g), "dual": dual_map(head, head, chunk, g)}

    return load_file(str(cached_file(folder, "semantic-self", fp, compute, progress)))


# ---- 1-2. forward passes: CKA and semantic fidelity ------------------------------------------------


@torch.no_grad()
def forward_measures(
    teacher: LoadedModel,
    student: LoadedModel,
    examples: list[Example],
    maps: dict[str, torch.Tensor],
    self_maps: dict[str, dict[str, torch.Tensor]],
    settings: DiagnoseSettings,
    progress: Progress,
) -> dict[str, Any]:
    t_arch, s_arch = teacher.arch, student.arch
    lt, ls = t_arch.n_layers, s_arch.n_layers
    cka = MinibatchCKA(lt, ls)  # over the response tokens
    cka_all = MinibatchCKA(lt, ls)  # over every token, prompt template included
    # a few items' response tokens are too few for one HSIC estimate: batches are pooled to cka_tokens tokens
    buffers: dict[str, dict[str, Any]] = {k: {"t": [], "s": [], "n": 0} for k in ("all", "response")}
    fid = _Mean()
    pad = student.tokenizer.pad_token_id or 0
    interp = {k: interpolation(lt, ls, k) for k in range(1, ls + 1)} if lt >= 2 else {}
    with progress.task("diagnose: CKA and semantic fidelity", total=len(examples)) as advance:
        for start in range(0, len(examples), settings.batch_size):
            chunk = examples[start : start + settings.batch_size]
            batch = collate_examples(chunk, pad)
            acts: dict[str, dict[int, torch.Tensor]] = {}
            for who, loaded in (("t", teacher), ("s", student)):
                arch, model = loaded.arch, loaded.model
                layer_out: dict[int, torch.Tensor] = {}
                mlp_out: dict[int, torch.Tensor] = {}
                n = arch.n_layers
                with (
                    capture({i: sublayer(model, arch, i, "layer") for i in range(n)}, layer_out),
                    capture({i: sublayer(model, arch, i, "mlp") for i in range(n)}, mlp_out),
                ):
                    dev = next(model.parameters()).device
                    model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
                acts[f"{who}_layer"] = {i: v.float().cpu() for i, v in layer_out.items()}
                acts[f"{who}_mlp"] = {i: v.float().cpu() for i, v in mlp_out.items()}
            for name, tokens in (("all", batch["attention_mask"].bool()), ("response", batch["labels"] != IGNORE_INDEX)):
                buf = buffers[name]
                buf["t"].append([acts["t_layer"][i][tokens] for i in range(lt)])
                buf["s"].append([acts["s_layer"][j][tokens] for j in range(ls)])
                buf["n"] += int(tokens.sum())
                if buf["n"] >= settings.cka_tokens:
                    _flush(buf, cka_all if name == "all" else cka)
            resp = response_positions(batch["labels"])
            h_t = {i: acts["t_mlp"][i][:, :-1][resp] for i in range(lt)}
            h_s = {j: acts["s_mlp"][j][:, :-1][resp] for j in range(ls)}
            for kind in ("paper_v1", "dual"):
                for i in range(lt):
                    fid.add(("teacher_self", kind, i + 1), map_activations(h_t[i], self_maps["teacher"][kind]), h_t[i])
                for j in range(ls):
                    fid.add(("student_self", kind, j + 1), map_activations(h_s[j], self_maps["student"][kind]), h_s[j])
            for k, (a, b, lam) in interp.items():
                target = interpolate(h_t[a - 1], h_t[b - 1], lam)
                for kind, m in maps.items():
                    fid.add(("cross", kind, k), map_activations(target, m), h_s[k - 1])
            advance(len(chunk))
    for name, buf in buffers.items():
        _flush(buf, cka_all if name == "all" else cka)
    per_layer = {
        who: {
            kind: [fid.get((who, kind, i)) for i in range(1, (lt if who == "teacher_self" else ls) + 1)]
            for kind in (("paper_v1", "dual", "random") if who == "cross" else ("paper_v1", "dual"))
        }
        for who in ("teacher_self", "student_self", "cross")
    }
    return {"cka": cka.value(), "cka_all_tokens": cka_all.value(), "fidelity": per_layer, "cka_batches": cka.batches}


def _flush(buf: dict[str, Any], acc: MinibatchCKA) -> None:
    """One CKA minibatch from the pooled tokens (skipped below the 4 tokens the unbiased HSIC needs)."""
    if buf["n"] >= 4:
        acc.update(
            [torch.cat([b[i] for b in buf["t"]]) for i in range(len(buf["t"][0]))],
            [torch.cat([b[j] for b in buf["s"]]) for j in range(len(buf["s"][0]))],
        )
    buf["t"], buf["s"], buf["n"] = [], [], 0


# ---- 3-4. the teacher's sensitivity and the weights each method moves -------------------------------


def concentration_and_similarity(
    teacher: LoadedModel,
    student: LoadedModel,
    task: Task,
    formatter: PromptFormatter,
    recipe: Any,
    settings: DiagnoseSettings,
    progress: Progress,
) -> dict[str, Any]:
    """Seeking's premise (sensitivity concentration) and the similarity of the blocks it would extract."""
    t_arch, s_arch = teacher.arch, student.arch
    roles = group_roles(["attention", "ffn"])
    spec = SeekingConfig(n_seed=settings.backward_items, structure="submatrix")
    sens = compute_sensitivity(
        teacher,
        task.split("seed"),
        spec,
        roles,
        formatter=recipe_formatter(teacher.tokenizer, task, recipe.task, variant="seeking-extract"),
        max_length=settings.max_length,
        progress=progress,
        what=f"task '{task.name}' seed split",
    )
    scores = sens.block_scores(t_arch.layers_path, t_arch.n_layers)
    layers = select_layers(scores, s_arch.n_layers) if s_arch.n_layers <= t_arch.n_layers else list(range(t_arch.n_layers))
    g = torch.Generator().manual_seed(settings.seed)
    rows: dict[str, dict[str, list[float]]] = {}
    for m, t_layer in enumerate(layers):
        for role in [*ATTENTION_ROLES, *FFN_ROLES]:
            p = sens.params.get(parameter_key(teacher.model, t_arch.module_name(t_layer, role)))
            if p is None or p.full is None:
                continue
            full = p.role(t_arch.role_rows(role)).full.double()  # type: ignore[union-attr]
            w_t = t_arch.role_weight(teacher.model, t_layer, role).float().cpu()  # a fused module's block of rows
            w_s = s_arch.role_weight(student.model, m, role).float().cpu()
            h, w = w_s.shape
            if h > full.shape[0] or w > full.shape[1]:
                continue  # the student is wider here: no block of its shape exists in the teacher
            total = float(full.sum()) or 1.0
            r0, c0, best = max_sum_submatrix(full, h, w)
            rnd_share, rnd_cos = [], []
            for _ in range(settings.random_draws):
                ri = torch.randperm(full.shape[0], generator=g)[:h].sort().values
                ci = torch.randperm(full.shape[1], generator=g)[:w].sort().values
                rnd_share.append(float(full[ri][:, ci].sum()) / total)
                rnd_cos.append(_cos(w_t[ri][:, ci], w_s))
            ui, uc = uniform_indices(full.shape[0], h), uniform_indices(full.shape[1], w)
            r = rows.setdefault(role, {k: [] for k in ("submatrix", "random", "uniform", "cos_submatrix", "cos_random")})
            r["submatrix"].append(best / total)
            r["random"].append(sum(rnd_share) / len(rnd_share))
            r["uniform"].append(float(full[ui][:, uc].sum()) / total)
            r["cos_submatrix"].append(_cos(w_t[r0 : r0 + h, c0 : c0 + w], w_s))
            r["cos_random"].append(sum(rnd_cos) / len(rnd_cos))
    del sens
    per_role = {role: {k: sum(v) / len(v) for k, v in r.items()} for role, r in rows.items()}
    return {"layer_scores": scores, "selected_layers": layers, "per_role": per_role}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0, eps=1e-12))


def laten_measures(
    teacher: LoadedModel,
    student: LoadedModel,
    task: Task,
    t_fmt: PromptFormatter,
    s_fmt: PromptFormatter,
    settings: DiagnoseSettings,
    progress: Progress,
) -> dict[str, Any]:
    """LaTen's located layers and the parametric similarity of its located FFN neurons."""
    items = task.split("seed")[: settings.locate_items]
    t_scores = mean_scores(
        locate_scores(
            teacher, [answer_input(t_fmt, it) for it in items], vocab_k=settings.locate_vocab, progress=progress, what="teacher"
        )
    )
    s_scores = mean_scores(
        locate_scores(
            student, [answer_input(s_fmt, it) for it in items], vocab_k=settings.locate_vocab, progress=progress, what="student"
        )
    )
    try:
        plan = plan_transfer(t_scores, s_scores, teacher.arch, student.arch, settings.transfer_rate)
    except ValueError as err:
        from pktransfer.errors import IncompatiblePairError

        raise IncompatiblePairError(f"diagnose (laten): {err}", hint="lower method.transfer_rate") from None
    t_arch, s_arch = teacher.arch, student.arch
    keep = uniform_indices(t_arch.hidden_size, s_arch.hidden_size)
    g = torch.Generator().manual_seed(settings.seed)
    located, control = [], []
    for k, t_layer in enumerate(plan["ffn"]["teacher_layers"]):
        t_idx, s_idx = plan["ffn"]["teacher"][k], plan["ffn"]["student"][k]
        down_t = stored_value(teacher.model.get_submodule(t_arch.module_name(t_layer, "down"))).detach().float().cpu()
        down_s = student.model.get_submodule(s_arch.module_name(k, "down")).weight.detach().float().cpu()
        cols_t = down_t[:, t_idx].T[:, keep]  # [n, D_S]
        cos = torch.nn.functional.cosine_similarity(cols_t.double(), down_s[:, s_idx].T.double(), dim=-1, eps=1e-12)
        located.append(float(cos.mean()))
        rnd = torch.randperm(down_s.shape[1], generator=g)[: len(s_idx)]
        cos_r = torch.nn.functional.cosine_similarity(cols_t.double(), down_s[:, rnd].T.double(), dim=-1, eps=1e-12)
        control.append(float(cos_r.mean()))
    return {
        "ffn_teacher_layers": plan["ffn"]["teacher_layers"],
        "attn_teacher_layers": plan["attn"]["teacher_layers"],
        "neurons_per_layer": plan["ffn"]["n"],
        "located_cosine_per_layer": located,
        "random_cosine_per_layer": control,
        "located_cosine": sum(located) / len(located),
        "random_cosine": sum(control) / len(control),
    }


# ---- the verdicts and the report -------------------------------------------------------------------


def verdicts(result: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    seek = result["seeking"]["per_role"]
    if seek:
        sub = sum(r["submatrix"] for r in seek.values()) / len(seek)
        rnd = sum(r["random"] for r in seek.values()) / len(seek)
        ratio = sub / rnd if rnd > 0 else float("inf")
        out.append(
            {
                "method": "seeking",
                "premise": "the task's sensitivity concentrates in the submatrices Seeking selects",
                "figure": f"selected blocks hold {100 * sub:.1f}% of their weight's sensitivity, random blocks of "
                f"the same shape {100 * rnd:.1f}% ({ratio:.2f}x)",
                "prediction": "the selection is informative; whether it helps is for the comparison to show"
                if ratio >= 1.5
                else "barely more than a random block: expect Seeking ≈ Seeking with structure: random",
            }
        )
    cross = result["fidelity"]["cross"]
    mean = {k: _mean([v for v in vals if v is not None]) for k, vals in cross.items()}
    out.append(
        {
            "method": "semalign",
            "premise": "teacher activations mapped through the semantic bases point where the student's own do",
            "figure": f"mean cos(target, student activation) over student layers: paper_v1 {mean['paper_v1']:.3f}, "
            f"dual {mean['dual']:.3f}, random map {mean['random']:.3f}",
            "prediction": "targets nearly orthogonal to the student's activations: the activation term pulls "
            "the student away from its own function (expect a drop)"
            if mean["paper_v1"] < 0.1
            else "targets carry the student's direction: the activation term can help",
        }
    )
    lat = result["laten"]
    diff = lat["located_cosine"] - lat["random_cosine"]
    out.append(
        {
            "method": "laten",
            "premise": "located teacher neurons resemble the student's located neurons (compatible parameters)",
            "figure": f"mean cos {lat['located_cosine']:.3f} for located pairs, {lat['random_cosine']:.3f} for "
            f"random student neurons",
            "prediction": "no parametric compatibility before training: the hypernetworks must learn the whole "
            "mapping from a few items (expect little change)"
            if diff < 0.05
            else "located neurons are measurably more alike than random ones: injection has something to build on",
        }
    )
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def pairings(result: dict[str, Any], n_teacher: int, n_student: int, critical: list[int]) -> dict[str, list[list[int]]]:
    """(teacher layer, student layer), 1-based, as each method pairs them."""
    grid = [[max(1, (n_teacher * k) // n_student), k] for k in range(1, n_student + 1)]
    crit = [[p.a, p.student] for p in layer_pairs(critical, n_teacher, n_student)] if n_teacher >= 2 else []
    return {
        "seeking": [[t + 1, m + 1] for m, t in enumerate(result["seeking"]["selected_layers"])],
        "semalign_grid": grid,
        "semalign_critical": crit,
        "laten": [[t + 1, m + 1] for m, t in enumerate(result["laten"]["ffn_teacher_layers"])],
    }


def diagnose_pair(
    teacher: LoadedModel,
    student: LoadedModel,
    task: Task,
    recipe: Any,
    settings: DiagnoseSettings,
    out: Path,
    cache: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Run every measurement and write ``diagnose.json``, ``report.md``, ``cka.png`` and ``fidelity.png``."""
    from pktransfer.models.pair import check_pair

    check_pair(teacher.arch, student.arch, teacher.tokenizer, student.tokenizer, "diagnose")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    s_fmt = recipe_formatter(student.tokenizer, task, recipe.task, recipe.method.name)
    t_fmt = recipe_formatter(teacher.tokenizer, task, recipe.task, recipe.method.name)
    t_arch, s_arch = teacher.arch, student.arch

    t0 = time.perf_counter()
    vocab = min(t_arch.vocab_size, s_arch.vocab_size, len(student.tokenizer))
    w_t, w_s = lm_head(teacher, vocab), lm_head(student, vocab)
    m_v1, _ = pair_map(w_t, w_s, cache, 8192, progress, "paper_v1")
    m_dual, _ = pair_map(w_t, w_s, cache, 8192, progress, "dual")
    g = torch.Generator().manual_seed(settings.seed)
    m_rand = torch.randn(m_v1.shape, generator=g)
    self_maps = {"teacher": _self_maps(w_t, cache, 8192, progress), "student": _self_maps(w_s, cache, 8192, progress)}
    seconds["semantic_maps"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    examples = _items(task, settings.items, s_fmt, settings.max_length)
    fwd = forward_measures(
        teacher, student, examples, {"paper_v1": m_v1, "dual": m_dual, "random": m_rand}, self_maps, settings, progress
    )
    seconds["forward_cka_fidelity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    backward = _items(task, settings.backward_items, t_fmt, settings.max_length)
    attribution = layer_attribution(
        teacher.model, t_arch.layers_path, t_arch.n_layers, backward, batch_size=settings.batch_size, progress=progress
    )
    critical = top_layers(attribution, min(settings.critical_layers, t_arch.n_layers))
    seconds["semalign_attribution"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seeking = concentration_and_similarity(teacher, student, task, t_fmt, recipe, settings, progress)
    seconds["seeking_sensitivity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    laten = laten_measures(teacher, student, task, t_fmt, s_fmt, settings, progress)
    seconds["laten_location"] = time.perf_counter() - t0

    cka = fwd["cka"]
    result: dict[str, Any] = {
        "teacher": teacher.name,
        "student": student.name,
        "task": task.name,
        "settings": asdict(settings),
        "cka": cka.tolist(),
        "cka_all_tokens": fwd["cka_all_tokens"].tolist(),
        "cka_estimator": "minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021), layer outputs; 'cka' over the "
        "response tokens, 'cka_all_tokens' over every token (prompt template included)",
        "fidelity": fwd["fidelity"],
        "semalign": {"attribution": attribution, "critical_layers": critical},
        "seeking": seeking,
        "laten": laten,
    }
    pairs = pairings(result, t_arch.n_layers, s_arch.n_layers, critical)
    result["pairings"] = pairs
    result["cka_along_pairings"] = {name: _mean([float(cka[t - 1, s - 1]) for t, s in p]) for name, p in pairs.items() if p}
    result["cka_best_per_student_layer"] = _mean([float(cka[:, j].max()) for j in range(s_arch.n_layers)])
    all_tok = fwd["cka_all_tokens"]
    result["cka_all_tokens_along_pairings"] = {
        name: _mean([float(all_tok[t - 1, s - 1]) for t, s in p]) for name, p in pairs.items() if p
    }
    result["best_teacher_layer_per_student_layer"] = [int(top_k(cka[:, j], 1)[0]) + 1 for j in range(s_arch.n_layers)]
    result["verdicts"] = verdicts(result)
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    result["seconds"]["total"] = round(sum(seconds.values()), 3)

    from pktransfer.plots import plot_cka, plot_fidelity

    plot_cka(cka, pairs, out / "cka.png", title=f"linear CKA: {teacher.name} vs {student.name}")
    plot_fidelity(fwd["fidelity"], out / "fidelity.png")
    write_json(out / "diagnose.json", result)
    write_text(out / "report.md", report_md(result))
    return result


def report_md(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        f"# Diagnosis: {r['teacher']} -> {r['student']} on {r['task']}",
        "",
        f"{s['items']} seed items for CKA and fidelity, {s['backward_items']} for the teacher's sensitivity and "
        f"attribution, {s['locate_items']} for LaTen's location (softmax over "
        f"{'the whole vocabulary' if s['locate_vocab'] is None else str(s['locate_vocab']) + ' logit-lens tokens'}). "
        f"No training. Cost: {r['seconds']['total']} s "
        f"({', '.join(f'{k} {v} s' for k, v in r['seconds'].items() if k != 'total')}).",
        "",
        "## Verdicts",
        "",
        "| method | premise | measured | predicts |",
        "|---|---|---|---|",
        *[f"| {v['method']} | {v['premise']} | {v['figure']} | {v['prediction']} |" for v in r["verdicts"]],
        "",
        "## Representation similarity (linear CKA of layer outputs)",
        "",
        "![CKA](cka.png)",
        "",
        f"Over the response tokens (the heat map); the best teacher layer per student layer averages "
        f"{r['cka_best_per_student_layer']:.3f}. The all-tokens column includes the prompt and its chat "
        "template, for comparison.",
        "",
        "| pairing | mean CKA, response tokens | mean CKA, all tokens | pairs (teacher, student), 1-based |",
        "|---|---:|---:|---|",
        *[
            f"| {name} | {r['cka_along_pairings'][name]:.3f} | {r['cka_all_tokens_along_pairings'][name]:.3f} | "
            f"{', '.join(f'({t}, {k})' for t, k in p)} |"
            for name, p in r["pairings"].items()
            if p
        ],
        "",
        "## Semantic-basis fidelity (SemAlign), MLP outputs at response positions",
        "",
        "![fidelity](fidelity.png)",
        "",
        "| measure | paper_v1 | dual | random map |",
        "|---|---:|---:|---:|",
    ]
    f = r["fidelity"]
    for who, label in (("teacher_self", "teacher, own round trip"), ("student_self", "student, own round trip")):
        lines.append(f"| {label} | {_fmt(f[who]['paper_v1'])} | {_fmt(f[who]['dual'])} | |")
    lines.append(
        f"| teacher -> student target vs the student's activation | {_fmt(f['cross']['paper_v1'])} | "
        f"{_fmt(f['cross']['dual'])} | {_fmt(f['cross']['random'])} |"
    )
    lines += [
        "",
        "(means over layers of the mean cosine over positions)",
        "",
        "## Sensitivity concentration and parametric similarity (Seeking)",
        "",
        f"Selected teacher layers (0-based): {r['seeking']['selected_layers']}.",
        "",
        "| role | share in Seeking's submatrix | random block | evenly spaced block | cos(block, student weight) "
        "| cos(random block, student weight) |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {role} | {100 * v['submatrix']:.2f}% | {100 * v['random']:.2f}% | {100 * v['uniform']:.2f}% | "
            f"{v['cos_submatrix']:.4f} | {v['cos_random']:.4f} |"
            for role, v in r["seeking"]["per_role"].items()
        ],
        "",
        "## Parametric similarity of LaTen's located neurons",
        "",
        f"Located FFN teacher layers (0-based): {r['laten']['ffn_teacher_layers']}; "
        f"{r['laten']['neurons_per_layer']} neurons per layer. Teacher down_proj columns, cut to the student's "
        "width by evenly spaced indices, against the student's located columns paired by rank: mean cos "
        f"{r['laten']['located_cosine']:.4f}; against random student neurons {r['laten']['random_cosine']:.4f}.",
        "",
    ]
    return "\n".join(lines)


def _fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    return f"{_mean(vals):.3f}" if vals else "n/a"


def diagnose(
    recipe: Any,
    *,
    settings: DiagnoseSettings | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Any:
    """``pkt diagnose``: the recipe's pair on its task's seed split, no training; writes ``OUTPUT/diagnose/``
    (diagnose.json, report.md, cka.png, fidelity.png) beside run.json (recipe, versions, timings)."""
    from pktransfer.pipeline import RunResult, TeacherHandle, check_recipe, run_folder, run_info

    progress = progress or Progress(quiet=quiet)
    settings = settings or DiagnoseSettings(seed=recipe.seed, max_length=recipe.training.max_length)
    task, _ = check_recipe(recipe)
    started = time.time()
    with run_folder(recipe, overwrite, progress) as (rd, log), TeacherHandle(recipe.teacher, log, progress) as handle:
        from pktransfer.models import load_model

        with log.stage("load_student"):
            student = load_model(recipe.student, log=progress.log)
        teacher = handle()
        with log.stage("diagnose"):
            result = diagnose_pair(
                teacher, student, task, recipe, settings, rd.work / "diagnose", rd.work / "semantic_cache", progress
            )
        info = run_info(recipe, log, started, verb="diagnose", verdicts=result["verdicts"], seconds=result["seconds"])
        rd.write_json("run.json", info)
    return RunResult(rd.finish(), info)
