"""SVD initialisation of LoRA factors and conversion of a re-based LoRA into a plain one."""

from __future__ import annotations

import torch


def svd_init(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of ``w`` [out, in]: B = U_r Σ_r [out, r], A = V_rᵀ [r, in], so B @ A ≈ w."""
    if rank > min(w.shape):
        raise ValueError(f"rank {rank} exceeds the smaller dimension of a {tuple(w.shape)} matrix")
    u, s, vh = torch.linalg.svd(w.to(torch.float32), full_matrices=False)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def rebase_as_plain_lora(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Express W − s·B0A0 + s·BA as a LoRA on the unmodified W: W + s'·[B | −B0][A ; A0] (rank 2r).

    Keys follow peft: ``lora_A``/``lora_embedding_A`` (rows = rank) and ``lora_B``/``lora_embedding_B``
    (columns = rank). The caller doubles r and alpha in the config so the scaling s' = s is unchanged
    and the concatenated factors reproduce BA − B0A0 exactly.
    """
    out = {}
    for name, t in trained.items():
        if name not in initial:
            raise KeyError(f"initial adapter lacks {name}")
        t0 = initial[name]
        if "lora_A" in name or "lora_embedding_A" in name:
            out[name] = torch.cat([t, t0], dim=0)
        elif "lora_B" in name or "lora_embedding_B" in name:
            out[name] = torch.cat([t, -t0], dim=1)
        else:
            out[name] = t
    return out
