"""Distillation math: KL between a teacher's (possibly top-k) distribution and the student's."""

from __future__ import annotations

import torch


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, teacher_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-position KL(p_T ‖ q_S) at temperature T.

    student_logits [N, V]; teacher_logits [N, K] (K = V when ``teacher_ids`` is None, else the teacher's
    logits at the token ids ``teacher_ids`` [N, K]). p_T is the softmax over the K teacher logits; q_S is
    the student's softmax over its whole vocabulary, read at the same ids. Non-negative (Gibbs).
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_ids is not None:
        log_q = log_q.gather(-1, teacher_ids.long())
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), as TRL computes it.

    student_logits, teacher_logits [N, V] -> [N]. With p_T, q_S the softmaxes at ``temperature`` and the mixture
    m = β·p_T + (1 − β)·q_S: JSD_β = β·KL(p_T ‖ m) + (1 − β)·KL(q_S ‖ m). β = 0 is the forward KL(p_T ‖ q_S) and
    β = 1 the reverse KL(q_S ‖ p_T) (the limits, taken exactly rather than through a degenerate mixture)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    b = torch.tensor(beta, dtype=log_q.dtype, device=log_q.device)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), dim=0)
    kl_teacher = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_student = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def hidden_distance(projected: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position distance between a projected student hidden state and the teacher's, [N, D] -> [N]:
    ``mse`` the mean squared error over the hidden dimension, ``cosine`` 1 − cos."""
    projected, target = projected.float(), target.float()
    if kind == "mse":
        return (projected - target).pow(2).mean(-1)
    if kind == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(projected, target, dim=-1, eps=1e-8)
    raise ValueError(f"unknown hidden distance '{kind}' (mse or cosine)")


def uniform_layer_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) for every student layer, spread evenly over the teacher's depth so the
    last layers meet: student layer i reads teacher layer ⌊(i + 1)·L_T / L_S⌋ − 1 (TinyBERT's uniform map
    g(m) = m·L_T/L_S for layers counted from 1, floored when L_S does not divide L_T)."""
    if n_student < 1 or n_teacher < n_student:
        raise ValueError(f"cannot pair {n_student} student layers with {n_teacher} teacher layers")
    return [(i, (i + 1) * n_teacher // n_student - 1) for i in range(n_student)]
