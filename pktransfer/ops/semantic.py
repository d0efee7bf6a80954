"""SemAlign's math (methods.md §3), as small pure functions on tensors.

Notation: W is a model's LM head as stored by torch, [V, D] (logits = h Wᵀ). Layers are numbered
1..L as in the paper; callers convert to module indices (l − 1).

- Layer pairing: student layer k <- teacher layer l_k = max(1, floor(L_T/L_S · k)); a critical teacher
  layer l* maps to k = min{k' : l_{k'} >= l*} (L_S if none); the target of student layer k is
  interpolated between teacher layers a = clamp(floor(u), 1, L_T − 1) and b = a + 1 with
  u = L_T·k/L_S and λ = clip(u − a, 0, 1) (λ = 0 on the grid when the ratio is an integer).
- Semantic bases: s_i = e_i · pinv(Wᵀ), unit-normalised; pinv(Wᵀ) = W (WᵀW)⁺, so every basis row is a
  row of W times one D×D matrix and the [V, D] basis never has to exist at once.
- Decompose / recompose: a = S_T h_T / ||h_T||, h~_S = S_Sᵀ a, i.e. h~_S = M h_T / ||h_T|| with the
  pair's recomposition map M = S_Sᵀ S_T [D_S, D_T], accumulated over vocabulary chunks (memory
  O(D_S·D_T + chunk·D) however large the vocabulary).
- ``decomposition: dual`` (not in the paper): a = W_T h_T (the teacher's own logits), h~_S = W_S⁺ a with
  W_S⁺ = (W_SᵀW_S)⁺ W_Sᵀ, so h~_S = (W_SᵀW_S)⁺ (W_Sᵀ W_T) h_T; exact within one model (W⁺W h = h for a
  head of full column rank), where the paper's unit-normalised bases are not. Same D×D factors, same
  chunked accumulation.
- Loss: [1 − mean cos(h_S, h~_S)] + [1 − mean cos(z, onehot(y))].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import torch

from pktransfer.ops.ranking import top_k

# ---- layer pairing --------------------------------------------------------------------------------


def grid_layer(n_teacher: int, n_student: int, k: int) -> int:
    """l_k = max(1, floor(L_T / L_S · k)): the teacher layer on the grid for student layer k (1-based)."""
    if not 1 <= k <= n_student:
        raise ValueError(f"student layer {k} outside 1..{n_student}")
    return max(1, (n_teacher * k) // n_student)


def student_layer_for(critical: int, n_teacher: int, n_student: int) -> int:
    """k = min{k' : l_{k'} >= l*}, or L_S when no grid layer reaches l*."""
    if not 1 <= critical <= n_teacher:
        raise ValueError(f"teacher layer {critical} outside 1..{n_teacher}")
    for k in range(1, n_student + 1):
        if grid_layer(n_teacher, n_student, k) >= critical:
            return k
    return n_student


def interpolation(n_teacher: int, n_student: int, k: int) -> tuple[int, int, float]:
    """(a, b, λ): student layer k's target is (1 − λ)·h_T(a) + λ·h_T(b), with exact rational u."""
    if n_teacher < 2:
        raise ValueError("interpolation needs a teacher with at least 2 layers")
    u = Fraction(n_teacher * k, n_student)
    a = min(max(math.floor(u), 1), n_teacher - 1)
    lam = min(max(u - a, Fraction(0)), Fraction(1))
    return a, a + 1, float(lam)


@dataclass(frozen=True)
class LayerPair:
    """One supervised student layer (1-based) and where its target comes from."""

    student: int
    grid: int  # l_k
    a: int
    b: int
    weight_b: float  # λ
    critical: tuple[int, ...]  # the critical teacher layers that chose this student layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_pairs(critical: list[int], n_teacher: int, n_student: int) -> list[LayerPair]:
    """The student layers that the critical teacher layers map to, in depth order, with their targets."""
    chosen: dict[int, list[int]] = {}
    for lt in critical:
        chosen.setdefault(student_layer_for(lt, n_teacher, n_student), []).append(lt)
    pairs = []
    for k in sorted(chosen):
        a, b, lam = interpolation(n_teacher, n_student, k)
        pairs.append(LayerPair(k, grid_layer(n_teacher, n_student, k), a, b, lam, tuple(sorted(chosen[k]))))
    return pairs


def top_layers(scores: Sequence[float], n: int) -> list[int]:
    """The n highest-scoring layers, 1-based as the SemAlign paper numbers them, in depth order."""
    return [i + 1 for i in top_k(scores, n, in_index_order=True).tolist()]


# ---- semantic bases -------------------------------------------------------------------------------


def gram_pinv(weight: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(WᵀW)⁺ [D, D] for an LM head W [V, D], accumulated over row chunks in float64 (returned float32).

    The pseudo-inverse (rather than the inverse) covers heads without full column rank.
    """
    d = weight.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)
    for r in range(0, weight.shape[0], chunk):
        w = weight[r : r + chunk].detach().to("cpu", torch.float64)
        gram += w.T @ w
    return torch.linalg.pinv(gram, hermitian=True).float()


def basis_rows(weight_rows: torch.Tensor, g_pinv: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit-normalised semantic basis rows s_i = e_i·pinv(Wᵀ) = W[i] (WᵀW)⁺ for a block of rows of W."""
    s = weight_rows.detach().to("cpu", torch.float32) @ g_pinv
    return s / s.norm(dim=1, keepdim=True).clamp_min(eps)  # an all-zero row (padding) stays zero


def semantic_bases(weight: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """The whole basis S [V, D] (small vocabularies and tests; large ones use ``recompose_map``)."""
    g = gram_pinv(weight, chunk)
    return torch.cat([basis_rows(weight[r : r + chunk], g) for r in range(0, weight.shape[0], chunk)])


def recompose_map(
    teacher_head: torch.Tensor,
    student_head: torch.Tensor,
    chunk: int = 8192,
    teacher_pinv: torch.Tensor | None = None,
    student_pinv: torch.Tensor | None = None,
) -> torch.Tensor:
    """M = S_Sᵀ S_T [D_S, D_T] over the shared vocabulary, one chunk of basis rows of each model at a time."""
    if teacher_head.shape[0] != student_head.shape[0]:
        raise ValueError(
            f"LM heads cover different vocabularies ({teacher_head.shape[0]} and "
            f"{student_head.shape[0]} rows); semantic alignment needs one shared vocabulary"
        )
    g_t = gram_pinv(teacher_head, chunk) if teacher_pinv is None else teacher_pinv
    g_s = gram_pinv(student_head, chunk) if student_pinv is None else student_pinv
    m = torch.zeros(student_head.shape[1], teacher_head.shape[1], dtype=torch.float64)
    for r in range(0, teacher_head.shape[0], chunk):
        s_t = basis_rows(teacher_head[r : r + chunk], g_t)
        s_s = basis_rows(student_head[r : r + chunk], g_s)
        m += (s_s.T @ s_t).double()
    return m.float()


def dual_map(
    teacher_head: torch.Tensor, student_head: torch.Tensor, chunk: int = 8192, student_pinv: torch.Tensor | None = None
) -> torch.Tensor:
    """M = (W_SᵀW_S)⁺ W_Sᵀ W_T [D_S, D_T]: h~_S = W_S⁺ (W_T h_T), accumulated over vocabulary chunks."""
    if teacher_head.shape[0] != student_head.shape[0]:
        raise ValueError(
            f"LM heads cover different vocabularies ({teacher_head.shape[0]} and "
            f"{student_head.shape[0]} rows); semantic alignment needs one shared vocabulary"
        )
    g_s = gram_pinv(student_head, chunk) if student_pinv is None else student_pinv
    cross = torch.zeros(student_head.shape[1], teacher_head.shape[1], dtype=torch.float64)
    for r in range(0, teacher_head.shape[0], chunk):
        w_s = student_head[r : r + chunk].detach().to("cpu", torch.float64)
        w_t = teacher_head[r : r + chunk].detach().to("cpu", torch.float64)
        cross += w_s.T @ w_t
    return (g_s.double() @ cross).float()


def decompose(h: torch.Tensor, bases: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Coefficients a = S h / ||h|| of activations h [..., D] on the bases S [V, D] -> [..., V]."""
    h = h.float()
    return (h @ bases.T) / h.norm(dim=-1, keepdim=True).clamp_min(eps)


def recompose(coefficients: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """h~ = Sᵀ a: coefficients [..., V] back to a hidden space [..., D]."""
    return coefficients @ bases


def map_activations(h_teacher: torch.Tensor, m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """recompose(decompose(h_T, S_T), S_S) through the pair's map: M h_T / ||h_T|| -> [..., D_S]."""
    h = h_teacher.float()
    return (h @ m.T.to(h.device)) / h.norm(dim=-1, keepdim=True).clamp_min(eps)


# ---- the loss -------------------------------------------------------------------------------------


def interpolate(h_a: torch.Tensor, h_b: torch.Tensor, weight_b: float) -> torch.Tensor:
    """(1 − λ)·h_a + λ·h_b (exactly h_a when λ = 0)."""
    if weight_b == 0.0:
        return h_a
    if weight_b == 1.0:
        return h_b
    return (1.0 - weight_b) * h_a + weight_b * h_b


def cosine_to_onehot(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """cos(z, onehot(y)) = z_y / ||z|| per position; logits [N, V], targets [N] -> [N]."""
    z = logits.float()
    return z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) / z.norm(dim=-1).clamp_min(eps)


def alignment_terms(
    student_acts: list[torch.Tensor], targets: list[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (not averaged) loss terms over N positions, so callers normalise over an accumulated batch.

    activation term: Σ_positions mean_pairs (1 − cos(h_S^(k), h~_S^(k)));  logit term: Σ (1 − cos(z, e_y)).
    student_acts / targets: one [N, D_S] tensor per supervised layer; logits [N, V]; labels [N].
    """
    if len(student_acts) != len(targets):
        raise ValueError("one target per supervised student layer")
    if student_acts:
        cos = torch.stack(
            [
                torch.nn.functional.cosine_similarity(h.float(), t.float().to(h.device), dim=-1, eps=1e-8)
                for h, t in zip(student_acts, targets, strict=True)
            ]
        )
        act = (1.0 - cos).mean(0).sum()
    else:
        act = logits.new_zeros((), dtype=torch.float32)
    logit = (1.0 - cosine_to_onehot(logits, labels)).sum()
    return act, logit


# ---- SemAlign v2 (arXiv 2510.24208 v2; ACL 2026 Findings) ------------------------------------------------


def one_source_per_target(scores: Sequence[float], n_teacher: int, n_student: int) -> list[int]:
    """Exactly one teacher layer (1-based) for each student layer k = 1..L_S (our reading of v2's layer attribution):
    the highest-scoring teacher layer in k's depth window (l_{k−1}, l_k] of the paper's pairing grid
    (l_k = max(1, floor(L_T/L_S·k)), l_0 = 0), ties to the deepest (the grid layer itself). The windows tile the
    teacher's depth, so the sources keep depth order and every teacher layer is a candidate for one target."""
    if n_teacher < n_student:
        raise ValueError(f"cannot pick a source for each of {n_student} student layers among {n_teacher} teacher layers")
    if len(scores) != n_teacher:
        raise ValueError(f"{len(scores)} scores for {n_teacher} teacher layers")
    out, low = [], 0
    for k in range(1, n_student + 1):
        high = grid_layer(n_teacher, n_student, k)
        window = range(low + 1, high + 1) if high > low else range(high, high + 1)
        out.append(max(window, key=lambda j: (scores[j - 1], j)))
        low = high
    return out


def centred_gram(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The token-token relation geometry of rows x [T, D]: the Gram matrix of the centred rows (each row minus the
    rows' mean), divided by its Frobenius norm. Invariant to any orthogonal map of the D dimensions, to adding one
    vector to every row, and to scale; [T, T]."""
    xc = x.float() - x.float().mean(0, keepdim=True)
    g = xc @ xc.T
    return g / g.norm().clamp_min(eps)


def relation_distance(student: torch.Tensor, teacher_gram: torch.Tensor) -> torch.Tensor:
    """||G(student) − G_T||²_F between the student rows' centred, normalised Gram and the teacher's (0 to 4)."""
    return (centred_gram(student) - teacher_gram.to(student.device).float()).pow(2).sum()


def fisher_quadratic(z_student: torch.Tensor, z_teacher: torch.Tensor) -> torch.Tensor:
    """½·dᵀ F d per position with d = z_S − z_T and F = diag(p) − p pᵀ, p = softmax(z_T): the Fisher-weighted
    quadratic surrogate of KL(p_T ‖ softmax(z_S)) around z_S = z_T (its second-order Taylor term; the ACL version's
    layer objective). Computed without forming F: Σ p d² − (Σ p d)². [N, V] -> [N]."""
    d = z_student.float() - z_teacher.float()
    p = torch.softmax(z_teacher.float(), dim=-1)
    pd = (p * d).sum(-1)
    return 0.5 * ((p * d * d).sum(-1) - pd * pd)
