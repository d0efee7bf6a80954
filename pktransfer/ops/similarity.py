"""Similarity between two models' representations and weights (``pkt diagnose``).

- Linear CKA (Kornblith et al. 2019): for centred X [n, D_a], Y [n, D_b] over the same n tokens,
  CKA = ||YᵀX||²_F / (||XᵀX||_F · ||YᵀY||_F); 1 for identical representations (and any rotation or
  isotropic scaling of them), near 0 for unrelated ones.
- Minibatch CKA (Nguyen et al. 2021): the unbiased HSIC estimator (Song et al. 2012) averaged over
  minibatches, CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) · mean HSIC(L, L)), so every layer pair of
  two models is accumulated batch by batch without holding any activations. It is what the diagnosis
  reports; for one batch it estimates the same quantity as linear CKA without its small-n bias.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of x [n, D_a] and y [n, D_b] (rows: the same n examples), in float64."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same examples: {x.shape[0]} rows against {y.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-300))


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC of every pair of Gram matrices: k [A, n, n], l [B, n, n] -> [A, B] (float64; n > 3).

    HSIC = [tr(K~L~) + 1ᵀK~1·1ᵀL~1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK~L~1] / (n(n−3)), K~ = K with a zero diagonal.
    """
    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples per batch, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    kt = k.double().masked_fill(eye, 0.0)
    lt = l.double().masked_fill(eye, 0.0)
    trace = kt.flatten(1) @ lt.flatten(1).T  # tr(K~L~) = Σ K~ ⊙ L~ (symmetric)
    k_rows, l_rows = kt.sum(-1), lt.sum(-1)  # K~1 [A, n], L~1 [B, n]
    both = k_rows.sum(-1)[:, None] * l_rows.sum(-1)[None, :] / ((n - 1) * (n - 2))
    middle = 2.0 / (n - 2) * (k_rows @ l_rows.T)
    return (trace + both - middle) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates CKA between every layer of one model (A) and every layer of another (B)."""

    def __init__(self, n_a: int, n_b: int) -> None:
        self.xy = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.xx = torch.zeros(n_a, dtype=torch.float64)
        self.yy = torch.zeros(n_b, dtype=torch.float64)
        self.batches = 0

    def update(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """One minibatch: per layer, the activations [n, D] of the same n tokens."""
        k = torch.stack([x.double() @ x.double().T for x in xs]).cpu()
        l = torch.stack([y.double() @ y.double().T for y in ys]).cpu()  # noqa: E741
        self.xy += unbiased_hsic(k, l)
        self.xx += torch.diagonal(unbiased_hsic(k, k))
        self.yy += torch.diagonal(unbiased_hsic(l, l))
        self.batches += 1

    def value(self) -> torch.Tensor:
        """[A, B] CKA (0 where a layer's representation has no variance)."""
        denom = (self.xx[:, None] * self.yy[None, :]).clamp_min(0).sqrt()
        return torch.where(denom > 0, self.xy / denom.clamp_min(1e-300), torch.zeros_like(self.xy))


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine of a [n, D] and b [n, D]."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12).mean())
