"""LaTen's locate and extract steps (methods.md §2.1-2.2; ``pktransfer.methods.laten``): the layer and neuron scores of
one item in one model on its answer token (``locate_scores``, hooks on stock transformers models and the pure scores of
``ops.neurons``), which teacher layer and neurons feed which student layer and neurons (``plan_transfer``), and the
teacher's vectors of those neurons (``extract``). The answer token of an item and the cache of located items a grid's
cells share are the method's (``methods.laten``): they read formatters and files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from pktransfer.ops.neurons import candidate_vocab, kv_rows, neuron_scores, post_norm_gain, restrict, sublayer_score
from pktransfer.ops.offload import input_device, stored_value
from pktransfer.ops.ranking import top_k

if TYPE_CHECKING:
    from pktransfer.models.arch import ArchitectureDescription

ROLES = ("up", "down", "v", "o")


@dataclass(frozen=True)
class AnswerInput:
    """What the logit lens looks at: the tokens before the answer token y, and y."""

    ids: tuple[int, ...]
    y: int


def self_subvalue(attn_self: torch.Tensor, v_last: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The official attention-neuron coefficient [H·hd]: the answer position's own value vector weighted by its
    attention to itself, per head (``attn_subvalues = a[:, :, -1, :] * v`` in the patched modeling_llama.py L445-447,
    of which knowledge_neurons.py L246 keeps source position -1 by ``.permute(1, 0, 2)[-1]``). ``attn_self`` [H]:
    a[h, last, last]; ``v_last`` [kvH·hd]: v_proj's output at the last position (repeated over the heads of a group)."""
    v = v_last.reshape(-1, head_dim)
    v = v.repeat_interleave(n_heads // v.shape[0], dim=0)
    return (attn_self.to(v.dtype)[:, None] * v).reshape(n_heads * head_dim)


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run ``model`` with the eager attention kernel (the one that returns attention probabilities), then restore."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def locate_scores(
    loaded: Any,
    inputs: list[AnswerInput],
    *,
    vocab_k: int | None,
    progress: Any,
    what: str,
    attn_score: str = "self_subvalue",
    on_item: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per input: ``attn_layer`` [L], ``ffn_layer`` [L], ``attn`` [L, H·hd], ``ffn`` [L, F] (float64, CPU).

    ``attn_score``: an attention neuron (head, dim) is scored through o_proj by ``self_subvalue`` (official: the answer
    position's own attention sub-value, :func:`self_subvalue`) or ``o_input`` (the whole attention output at the answer
    position, every source position's contribution)."""
    model, arch = loaded.model, loaded.arch
    device = input_device(model)
    norm = model.get_submodule(arch.final_norm_module)
    head_w = stored_value(model.get_output_embeddings()).detach().to(device)
    n_layers = arch.n_layers
    cap = arch.logit_softcap
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

        handles += [
            block.register_forward_pre_hook(pre(f"in{i}"), with_kwargs=True),
            block.self_attn.register_forward_hook(post(f"attn_raw{i}")),
            model.get_submodule(arch.sublayer_name(i, "attention")).register_forward_hook(post(f"attn{i}")),
            block.self_attn.o_proj.register_forward_pre_hook(pre(f"o{i}"), with_kwargs=True),
            block.mlp.down_proj.register_forward_pre_hook(pre(f"down{i}"), with_kwargs=True),
            block.mlp.register_forward_hook(post(f"mlp_raw{i}")),
            model.get_submodule(arch.sublayer_name(i, "mlp")).register_forward_hook(post(f"mlp{i}")),
        ]
        if attn_score == "self_subvalue":
            handles.append(model.get_submodule(arch.module_name(i, "v")).register_forward_hook(post(f"v{i}")))
    v_rows = arch.role_rows("v")
    f_size, a_size = arch.intermediate_size, arch.n_heads * arch.head_dim
    results = []
    try:
        with progress.task(f"laten: locate in the {what}", total=len(inputs)) as advance:
            for inp in inputs:
                out = {
                    "attn_layer": torch.zeros(n_layers, dtype=torch.float64),
                    "ffn_layer": torch.zeros(n_layers, dtype=torch.float64),
                    "attn": torch.zeros(n_layers, a_size, dtype=torch.float64),
                    "ffn": torch.zeros(n_layers, f_size, dtype=torch.float64),
                }
                y, pos = inp.y, len(inp.ids) - 1
                ids = torch.tensor([list(inp.ids)], device=device)
                if attn_score == "self_subvalue":
                    with eager_attention(model):
                        attentions = model(input_ids=ids, output_attentions=True).attentions
                else:
                    model(input_ids=ids)
                for i in range(n_layers):
                    # this layer's captures at the answer position, on one device (a sharded teacher's layers
                    # sit on several)
                    at = {k: seen[f"{k}{i}"][0, pos].to(device) for k in CAPTURES}
                    if attn_score == "self_subvalue":
                        v_last = seen[f"v{i}"][0, pos, v_rows].to(device).float()
                        a_self = attentions[i][0, :, pos, pos].to(device).float()
                        at["o"] = self_subvalue(a_self, v_last, arch.n_heads, arch.head_dim)
                    h_in = at["in"].float()
                    h_mid = h_in + at["attn"].float()
                    vocab = candidate_vocab([h_in, h_mid], norm, head_w, y, vocab_k, cap)
                    head, yi = restrict(head_w, y, vocab)
                    layer = model.get_submodule(f"{arch.layers_path}.{i}")
                    down_w, o_w = stored_value(layer.mlp.down_proj), stored_value(layer.self_attn.o_proj)
                    down_dirs = _through_post_norm(model, arch, i, "mlp", down_w.T.to(device), at["mlp_raw"])
                    o_dirs = _through_post_norm(model, arch, i, "attention", o_w.T.to(device), at["attn_raw"])
                    out["attn_layer"][i] = sublayer_score(h_in, at["attn"].float(), norm, head, yi, cap)
                    out["ffn_layer"][i] = sublayer_score(h_mid, at["mlp"].float(), norm, head, yi, cap)
                    out["ffn"][i] = neuron_scores(h_mid, at["down"], down_dirs, norm, head, yi, softcap=cap).double().cpu()
                    out["attn"][i] = neuron_scores(h_in, at["o"], o_dirs, norm, head, yi, softcap=cap).double().cpu()
                seen.clear()
                results.append(out)
                if on_item is not None:  # e.g. stored at once, so a stopped run keeps what it located
                    on_item(len(results) - 1, out)
                advance(1)
    finally:
        for h in handles:
            h.remove()
    return results


CAPTURES = ("in", "attn", "attn_raw", "mlp", "mlp_raw", "down", "o")  # what locate_scores hooks, per layer


def _through_post_norm(
    model: Any, arch: Any, layer: int, point: str, directions: torch.Tensor, raw: torch.Tensor
) -> torch.Tensor:
    """A sublayer's neuron directions [F, D] as they enter the residual stream: unchanged for pre-norm families,
    scaled by the post-norm's gain at this token (``ops.neurons.post_norm_gain``) for Gemma 2/3 and OLMo-2."""
    if not arch.post_norms:
        return directions
    norm = model.get_submodule(arch.sublayer_name(layer, point))
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    gain = post_norm_gain(raw, stored_value(norm).detach().to(raw.device), eps, arch.spec.post_norm_offset)
    return directions * gain.to(directions.dtype)


def mean_scores(scores: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in scores]).mean(0) for k in scores[0]}


def rounded_scores(scores: torch.Tensor, decimals: int | None) -> torch.Tensor:
    """Scores as the official code ranks them: ``round(score, decimals)`` stored in a float32 table (None: as they
    are). Rounded half to even on the float64 value scaled by 10^decimals."""
    if decimals is None:
        return scores
    scale = 10.0**decimals
    return (torch.round(scores.double() * scale) / scale).float()


def plan_transfer(
    t_scores: dict[str, torch.Tensor],
    s_scores: dict[str, torch.Tensor],
    t_arch: ArchitectureDescription,
    s_arch: ArchitectureDescription,
    rate: float,
    count: str = "floor",
    decimals: int | None = None,
) -> dict[str, Any]:
    """Which teacher layer and neurons feed which student layer and neurons (``count``: the neurons per layer,
    ``rate`` x the student's size, ``floor``-ed as the official ``int()`` or ``round``-ed; at least one;
    ``decimals``: neuron scores rounded first, :func:`rounded_scores`).

    Returns per role family (``ffn``, ``attn``): ``teacher_layers`` [L_S] (0-based, in order) and per student
    layer k the teacher / student neuron indices, paired by rank.
    """
    plan: dict[str, Any] = {}
    for fam, size_s, size_t in (
        ("ffn", s_arch.intermediate_size, t_arch.intermediate_size),
        ("attn", s_arch.n_heads * s_arch.head_dim, t_arch.n_heads * t_arch.head_dim),
    ):
        n = max(1, int(rate * size_s) if count == "floor" else round(rate * size_s))
        if n > size_t:
            raise ValueError(f"{n} {fam} neurons per layer asked for, the teacher has {size_t}")
        layers = top_k(t_scores[f"{fam}_layer"], s_arch.n_layers, in_index_order=True).tolist()
        plan[fam] = {
            "teacher_layers": layers,
            "n": n,
            "teacher": [top_k(rounded_scores(t_scores[fam][t], decimals), n) for t in layers],
            "student": [top_k(rounded_scores(s_scores[fam][k], decimals), n) for k in range(s_arch.n_layers)],
        }
    return plan


def _rows(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a teacher weight (resident or offloaded), as float32 on the CPU."""
    return weight.detach()[idx.to(weight.device)].float().cpu()


def extract(teacher: Any, plan: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """Per role, per student layer, the teacher vectors on its hidden axis [n, D_T] (float32, CPU)."""
    arch: ArchitectureDescription = teacher.arch
    weight = partial(arch.role_weight, teacher.model)  # a fused module's rows of that role (Phi-3)
    out: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}
    for k, t in enumerate(plan["ffn"]["teacher_layers"]):
        idx = plan["ffn"]["teacher"][k]
        out["up"].append(_rows(weight(t, "up"), idx))
        out["down"].append(_rows(weight(t, "down").T, idx))
    for k, t in enumerate(plan["attn"]["teacher_layers"]):
        pos = plan["attn"]["teacher"][k]
        rows = kv_rows(pos, arch.n_heads, arch.n_kv_heads, arch.head_dim)
        out["v"].append(_rows(weight(t, "v"), rows))
        out["o"].append(_rows(weight(t, "o").T, pos))
    return out
