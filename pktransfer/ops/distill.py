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
