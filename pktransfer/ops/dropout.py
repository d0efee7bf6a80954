"""Dropout whose mask costs ~p·n random numbers instead of n: the dropped positions of a Bernoulli(p) process,
drawn through its geometric gaps.

The positions dropped by i.i.d. Bernoulli(p) trials are exactly a sequence whose gaps G (kept positions between two
dropped ones) are i.i.d. Geometric(p): P(G = g) = (1 − p)^g·p. A gap is drawn by inversion from one uniform,
G = ⌊log(V) / log(1 − p)⌋ with V uniform on (0, 1] (P(G ≥ g) = P(V ≤ (1 − p)^g) = (1 − p)^g). So a mask over n
elements needs about n·p uniforms, 5% of what ``torch.nn.Dropout`` draws at p = 0.05, and CPU random numbers are
what LoRA dropout spends its time on (measured in bench/train_step.py). Same distribution, same 1/(1 − p) scaling of
the kept elements, another random stream.
"""

from __future__ import annotations

import math

import torch


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The positions in [0, n) that i.i.d. Bernoulli(p) trials drop, ascending (int64)."""
    if n <= 0 or p <= 0:
        return torch.empty(0, dtype=torch.long)
    if p >= 1:
        return torch.arange(n)
    log_keep = math.log1p(-p)
    out = []
    start = 0
    mean = n * p
    while start < n:
        # enough gaps to pass n with overwhelming probability; a short draw is completed by the next round
        k = int(mean + 6 * math.sqrt(mean) + 16)
        u = torch.rand(k, dtype=torch.float64, generator=generator)
        gaps = torch.floor(torch.log1p(-u) / log_keep).to(torch.long)  # log1p(-u) = log V, V = 1 − u in (0, 1]
        pos = start + torch.cumsum(gaps + 1, 0) - 1
        out.append(pos[pos < n])
        start = int(pos[-1]) + 1
        mean = max((n - start) * p, 1.0)
    return torch.cat(out)


class GeometricDropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` (same p, same scaling, same eval-mode identity) with the mask drawn as
    ``dropped_positions``; on CUDA, where random numbers are cheap, the native kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.is_cuda:
            return super().forward(x)
        out = (x * (1.0 / (1.0 - self.p))).contiguous()
        out.view(-1).index_fill_(0, dropped_positions(out.numel(), self.p).to(out.device), 0)
        return out
