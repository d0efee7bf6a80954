"""LaTen's locate step (methods.md §2.1) as pure functions: log-probability of the answer token under the
logit lens, and how much a layer or a single neuron raises it.

For a residual vector h, log p(y | h) = log_softmax(lm_head(final_norm(h)))[y]. A sublayer's score is
log p(y | h + out) − log p(y | h); an FFN neuron i's score is log p(y | h + m_i·W_down[:, i]) − log p(y | h)
(its activation times its down-projection column), an attention neuron's the same through a column of
o_proj with the attention output (before o_proj) as coefficient.

``vocab`` restricts the softmax to a set of token ids (which must contain y): the exact score uses the
whole vocabulary (``None``); a restricted set (the top tokens of the logit lens at the base residual)
makes the search much cheaper on CPU, and equals the exact score when it covers the vocabulary.

Families beyond LaTen's Llama (declared in models/arch.py): a sublayer's contribution is read after its
post-norm where the family has one (Gemma 2/3, OLMo-2), a neuron's direction goes through that post-norm's
gain at the token (``post_norm_gain``), and the lens soft-caps its logits where the model does (Gemma 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Norm = Callable[[torch.Tensor], torch.Tensor]


def lens_logits(residual: torch.Tensor, norm: Norm, head: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """The logit lens: head(final_norm(h)) for residuals [N, D], soft-capped as the model's own logits are
    (c · tanh(logits / c), Gemma 2) when ``softcap`` is set."""
    logits = norm(residual).float().to(head.device) @ head.float().T  # a sharded model's final norm may sit elsewhere
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def log_prob(residual: torch.Tensor, norm: Norm, head: torch.Tensor, y: int, softcap: float | None = None) -> torch.Tensor:
    """log p(y | h) for residuals [N, D] through ``norm`` and the head rows [V', D] (y indexes those rows)."""
    return torch.log_softmax(lens_logits(residual, norm, head, softcap), dim=-1)[:, y]


def candidate_vocab(
    bases: list[torch.Tensor], norm: Norm, head: torch.Tensor, y: int, k: int | None, softcap: float | None = None
) -> torch.Tensor | None:
    """Token ids for the restricted softmax: the top-k logit-lens tokens at each base residual and y."""
    if k is None or k >= head.shape[0]:
        return None
    ids = [torch.tensor([y], device=head.device)]
    for h in bases:
        ids.append(lens_logits(h.reshape(1, -1), norm, head, softcap)[0].topk(k).indices)
    return torch.unique(torch.cat(ids))


def restrict(head: torch.Tensor, y: int, vocab: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Head rows of ``vocab`` and y's index among them (the whole head when vocab is None)."""
    if vocab is None:
        return head, y
    return head[vocab], int((vocab == y).nonzero()[0, 0])


def sublayer_score(
    base: torch.Tensor, out: torch.Tensor, norm: Norm, head: torch.Tensor, y: int, softcap: float | None = None
) -> float:
    """log p(y | h + out) − log p(y | h) for one residual h [D] and sublayer output [D]."""
    lp = log_prob(torch.stack([base + out, base]), norm, head, y, softcap)
    return float(lp[0] - lp[1])


def neuron_scores(
    base: torch.Tensor,
    coefficients: torch.Tensor,
    directions: torch.Tensor,
    norm: Norm,
    head: torch.Tensor,
    y: int,
    chunk: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """log p(y | h + c_i·d_i) − log p(y | h) for every neuron i: coefficients [F], directions [F, D] -> [F].

    Candidates are formed ``chunk`` neurons at a time, so memory stays O(chunk · (D + V')).
    """
    if chunk is None:
        chunk = max(1, (1 << 24) // max(1, head.shape[0]))
    h = base.float()
    ref = log_prob(h.reshape(1, -1), norm, head, y, softcap)[0]
    out = torch.empty(coefficients.shape[0], dtype=torch.float32, device=h.device)
    for r in range(0, coefficients.shape[0], chunk):
        cand = h + coefficients[r : r + chunk, None].float() * directions[r : r + chunk].float()
        out[r : r + chunk] = log_prob(cand.to(base.dtype), norm, head, y, softcap) - ref
    return out


def kv_rows(positions: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """v_proj output rows feeding o_proj input positions (grouped-query attention shares kv heads)."""
    head, dim = positions // head_dim, positions % head_dim
    return (head // (n_heads // n_kv_heads)) * head_dim + dim


def post_norm_gain(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """The post-norm of Gemma 2/3 and OLMo-2 at its operating point x [D]: RMSNorm(x) = gain ⊙ x with
    gain = (offset + weight) / sqrt(mean(x²) + eps). A neuron's contribution m_i·d_i to x enters the residual
    stream as gain ⊙ (m_i·d_i) with the scale held at the token's own (the usual linearisation of a norm in
    attribution); for pre-norm families there is no post-norm and the gain is 1."""
    xf = x.float()
    return (offset + weight.float()) * torch.rsqrt(xf.pow(2).mean() + eps)
