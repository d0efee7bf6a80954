"""LaTen's align and inject steps (methods.md §2.3-2.4; ``pktransfer.methods.laten``): one hypernetwork per module type
maps the teacher's located vectors onto the student's hidden axis, the ``Injection`` adds them at the student's own
located rows and columns (hooks while training, merged into the weights at the end), the delta penalty, the official
learning-rate schedule and the rule that picks a checkpoint on validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pktransfer.ops.location import ROLES
from pktransfer.ops.neurons import kv_rows

if TYPE_CHECKING:
    from pktransfer.models.arch import ArchitectureDescription


class HyperNet(torch.nn.Module):
    """Linear(D_T -> D_T) -> ReLU -> Linear(D_T -> D_S), no bias, weights drawn from N(0, init_std²)."""

    def __init__(self, d_teacher: int, d_student: int, init_std: float = 1e-5) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_teacher, d_teacher, bias=False), torch.nn.ReLU(), torch.nn.Linear(d_teacher, d_student, bias=False)
        )
        for layer in (self.net[0], self.net[2]):
            torch.nn.init.normal_(layer.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Injection:
    """Where the mapped vectors go in the student: per role and layer, the module and its row/column indices.

    up: rows of up_proj; down: columns of down_proj; v: rows of v_proj; o: columns of o_proj. A student v row
    shared by several located attention positions (grouped kv heads) receives only the best-ranked pair's.
    In a fused module (Phi-3's gate_up_proj, qkv_proj) the row indices are offset to the role's own block.
    """

    AXIS: ClassVar[dict[str, str]] = {"up": "rows", "down": "cols", "v": "rows", "o": "cols"}

    def __init__(self, student: Any, plan: dict[str, Any]) -> None:
        arch: ArchitectureDescription = student.arch
        self.modules: dict[str, list[str]] = {r: [] for r in ROLES}
        self.index: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}
        self.keep: dict[str, list[torch.Tensor]] = {r: [] for r in ROLES}  # which extracted vectors are used
        for k in range(arch.n_layers):
            idx = plan["ffn"]["student"][k]
            for role in ("up", "down"):
                self.modules[role].append(arch.module_name(k, role))
                self.index[role].append(idx + (arch.role_rows(role).start or 0) if role == "up" else idx)
                self.keep[role].append(torch.arange(len(idx)))
            pos = plan["attn"]["student"][k]
            rows = kv_rows(pos, arch.n_heads, arch.n_kv_heads, arch.head_dim)
            keep: list[int] = []  # the first (best-ranked) located position of each distinct kv row
            seen: set[int] = set()
            for i, r in enumerate(rows.tolist()):
                if r not in seen:
                    seen.add(r)
                    keep.append(i)
            first = torch.tensor(keep, dtype=torch.long)
            self.modules["v"].append(arch.module_name(k, "v"))
            self.index["v"].append(rows[first] + (arch.role_rows("v").start or 0))
            self.keep["v"].append(first)
            self.modules["o"].append(arch.module_name(k, "o"))
            self.index["o"].append(pos)
            self.keep["o"].append(torch.arange(len(pos)))

    def hooks(self, model: Any, deltas: dict[str, list[torch.Tensor]]) -> list[Any]:
        """Forward hooks adding x·Δᵀ for the current ``deltas`` (read at call time), without a dense Δ."""
        handles = []
        for role in ROLES:
            for k, name in enumerate(self.modules[role]):
                handles.append(model.get_submodule(name).register_forward_hook(self._hook(role, k, deltas)))
        return handles

    def _hook(self, role: str, k: int, deltas: dict[str, list[torch.Tensor]]) -> Any:
        idx = self.index[role][k]

        def hook(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            x, d = args[0], deltas[role][k]
            i = idx.to(out.device)
            if self.AXIS[role] == "rows":  # Δ[idx] = d: output channels idx gain x·dᵀ
                return out.index_add(-1, i, (x @ d.to(x.dtype).T).to(out.dtype))
            return out + (x[..., i] @ d.to(x.dtype)).to(out.dtype)  # Δ[:, idx] = dᵀ

        return hook

    @torch.no_grad()
    def merge(self, model: Any, deltas: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Add the deltas into the weights; return them as tensors (``MODULE::rows|cols`` and ``MODULE::values``)."""
        saved = {}
        for role in ROLES:
            for k, name in enumerate(self.modules[role]):
                w = model.get_submodule(name).weight
                idx, d = self.index[role][k].to(w.device), deltas[role][k].detach().to(w.device, w.dtype)
                if self.AXIS[role] == "rows":
                    w[idx] += d
                else:
                    w[:, idx] += d.T
                saved[f"{name}::{self.AXIS[role]}"] = idx.cpu().clone()  # up and down share their indices
                saved[f"{name}::values"] = d.cpu().contiguous()
        return saved


def mapped_deltas(
    hyper: dict[str, HyperNet], vectors: dict[str, list[torch.Tensor]], injection: Injection, device: torch.device
) -> dict[str, list[torch.Tensor]]:
    """Every layer's extracted teacher vectors through its role's hypernetwork (one call per role) -> [n, D_S]."""
    out: dict[str, list[torch.Tensor]] = {}
    for role in ROLES:
        used = [v[keep] for v, keep in zip(vectors[role], injection.keep[role], strict=True)]
        mapped = hyper[role](torch.cat(used).to(device))
        out[role] = list(mapped.split([len(u) for u in used]))
    return out


def delta_penalty(deltas: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """Σ over module types of MSE(Δ, 0), each over that type's deltas of every layer together (the official
    code stacks the layers of a module type and takes one mean)."""
    return torch.stack([torch.cat([d.flatten() for d in ds]).pow(2).mean() for ds in deltas.values()]).sum()


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, total_steps: int, pct_start: float) -> Any:
    """The official schedule: OneCycleLR(max_lr, total_steps, pct_start, final_div_factor=1, cosine)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, final_div_factor=1, anneal_strategy="cos"
    )


def choose_step(val_losses: dict[int, float]) -> int:
    """The documented rule: the step with the lowest validation CE on the held-out align items; ties go to
    the earlier step. Step 0 (the untrained hypernetworks) is not a candidate."""
    candidates = {s: v for s, v in val_losses.items() if s > 0}
    return min(candidates, key=lambda s: (candidates[s], s))
