"""Moving a weight update between two models' coordinates by orthogonal Procrustes on observed activations.

Theseus ("Transporting Task Vectors across Different Architectures without Training", arXiv 2602.12952; official
code: apanariello4/merge-and-rebase ``rebase/methods/theseus.py``): for a linear map with update ΔW_T [out_T, in_T]
in the source (teacher), estimate an input map T_in [in_T, in_S] and an output map T_out [out_T, out_S] from the
same inputs run through both models, each the orthogonal Procrustes solution that best carries the teacher's
activations onto the student's (a·T ≈ b, rows are tokens), and transport the update in closed form:

    ΔW_S = T_outᵀ · ΔW_T · T_in                                     (theseus.py ``_transport_weight``)

Procrustes: T = U·Vᵀ from the SVD U·Σ·Vᵀ of the cross-covariance aᵀb (``_compute_procrustes_map_from_cov``), with
optional centring (``center_acts``, default off) and partial whitening (``whiten_power``, default 0), both as the
official code computes them.

One deliberate difference, where the official code's answer is arbitrary: when the activations do not span a width
(32 seed items of ~60 tokens against an MLP width of 4,864; or a first layer, whose inputs are just the distinct
tokens' embeddings), aᵀb is rank-deficient and its SVD completes U and V with arbitrary directions, which the official
map then pairs arbitrarily (measured: an identity pair's map is then far from the identity). Here only singular
directions above a relative tolerance are kept, so directions no activation visited map to zero instead of to noise.
Where the activations span both widths the two are the same map.
"""

from __future__ import annotations

import torch


def _psd_power(matrix: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    sym = 0.5 * (matrix + matrix.T)
    evals, evecs = torch.linalg.eigh(sym)
    return (evecs * evals.clamp_min(eps).pow(power)[None, :]) @ evecs.T


RANK_TOLERANCE = 1e-12  # singular values of aᵀb (float64) below this share of the largest are numerical zeros


def procrustes_with_rank(
    a: torch.Tensor, b: torch.Tensor, *, center: bool = False, whiten_power: float = 0.0, whiten_eps: float = 1e-6
) -> tuple[torch.Tensor, int]:
    """The orthogonal map T [d_a, d_b] with a·T ≈ b for activation rows a [n, d_a] and b [n, d_b] (same inputs), and
    the rank of aᵀb it was determined on.

    T = U·Vᵀ over the SVD of aᵀb (float64), optionally after centring both sides and partial whitening
    (aᵀa)^(−p)·aᵀb·(bᵀb)^(−p) (0 <= p <= 0.5), as theseus.py; directions with singular values under
    ``RANK_TOLERANCE`` of the largest are left out (module docstring). With fewer rows than the smaller width the
    SVD runs on the n x n core of thin QR factors of aᵀ and bᵀ (the same map, far cheaper for MLP widths)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"activation rows differ: {a.shape[0]} and {b.shape[0]}")
    if not 0.0 <= whiten_power <= 0.5:
        raise ValueError("whiten_power must be in [0, 0.5]")
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    if center:
        a, b = a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)
    n, d_a, d_b = a.shape[0], a.shape[1], b.shape[1]
    if n >= min(d_a, d_b) or whiten_power > 0:
        cov = a.T @ b
        if whiten_power > 0:
            cov = _psd_power(a.T @ a, -whiten_power, whiten_eps) @ cov @ _psd_power(b.T @ b, -whiten_power, whiten_eps)
        u, sv, vh = torch.linalg.svd(cov, full_matrices=False)
    else:
        q_a, r_a = torch.linalg.qr(a.T)  # aᵀ = Q_a R_a: Q_a [d_a, n]
        q_b, r_b = torch.linalg.qr(b.T)
        u_k, sv, vh_k = torch.linalg.svd(r_a @ r_b.T)  # aᵀb = Q_a (R_a R_bᵀ) Q_bᵀ
        u, vh = q_a @ u_k, (q_b @ vh_k.T).T
    k = int((sv > RANK_TOLERANCE * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0
    return (u[:, :k] @ vh[:k]).float(), k


def procrustes_map(
    a: torch.Tensor, b: torch.Tensor, *, center: bool = False, whiten_power: float = 0.0, whiten_eps: float = 1e-6
) -> torch.Tensor:
    """The orthogonal (on the visited span) map T [d_a, d_b] with a·T ≈ b; see :func:`procrustes_with_rank`."""
    return procrustes_with_rank(a, b, center=center, whiten_power=whiten_power, whiten_eps=whiten_eps)[0]


def transport(delta: torch.Tensor, t_in: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
    """ΔW_S = T_outᵀ · ΔW_T · T_in for a linear weight update ΔW_T [out_T, in_T] (y = W x)."""
    return t_out.T.to(delta.dtype) @ delta @ t_in.to(delta.dtype)


def energy_beyond_rank(matrix: torch.Tensor, rank: int) -> float:
    """The share of ``matrix``'s squared Frobenius norm beyond its top ``rank`` singular values (0 for a matrix of
    rank <= ``rank``, 0 for a zero matrix): what truncating it to a rank-r LoRA loses."""
    s = torch.linalg.svdvals(matrix.detach().to("cpu", torch.float64))
    total = float((s**2).sum())
    return float((s[rank:] ** 2).sum()) / total if total > 0 else 0.0
