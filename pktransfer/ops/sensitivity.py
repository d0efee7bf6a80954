"""Streaming first-order sensitivity S_i = Σ_j |θ_i · ∂L_j/∂θ_i| (Seeking, methods.md §1.1).

One backward per seed sample. A post-accumulate-grad hook on every parameter folds |θ·g| into that
parameter's accumulator the moment its gradient exists, then frees the gradient: the model never holds
a full set of gradients. Accumulators keep only what the selection needs, in float32:

- ``full``: the per-element map (the exact submatrix search needs it; dtype configurable),
- ``rows`` / ``cols``: per-row and per-column sums (every other structure, and layer scores),
- ``total``: the sum (always; layer scores are sums of totals over a block).

A fused weight (Phi-3's qkv_proj, gate_up_proj) holds several roles in blocks of rows (``parts``: the row
boundaries). Its column sums are kept per block ([n_parts, columns]), so each role's reduction sees only
its own rows (``ParamSensitivity.role``), exactly as if the roles were separate matrices.

Large tensors are processed in row chunks of about a megabyte, so the temporary |θ·g| stays in cache
and the extra memory traffic per sample is little more than one read of the weights and gradients.

The vocabulary matrices (embedding and lm_head, reduced along the hidden axis only) never get a dense
gradient: lm_head's gradient is formed chunk by chunk over the vocabulary from the module's input and
output gradient, and the embedding's only for the rows of the tokens in the sample.

Sharded teachers (accelerate ``device_map``): each accumulator lives on its parameter's device while samples
stream (an offloaded parameter's on the CPU, where its weights are kept), and the finished sensitivity is
gathered on the CPU. An offloaded module gets a fresh parameter on its execution device for every forward;
the hook is registered on that copy as it is made (``_watch_offloaded``), so offloaded parameters count
exactly as resident ones do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from pktransfer.ops.offload import offload_hook, stored_value

MODES = ("full", "reduced", "cols", "total")


@dataclass
class ParamSensitivity:
    mode: str
    shape: tuple[int, ...]
    total: torch.Tensor  # float64 scalar
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    full: torch.Tensor | None = None
    parts: tuple[int, ...] | None = None  # a fused weight's row boundaries (cols is then [n_parts, columns])

    @classmethod
    def empty(
        cls,
        shape: tuple[int, ...],
        mode: str,
        map_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        parts: tuple[int, ...] | None = None,
    ) -> ParamSensitivity:
        if mode not in MODES:
            raise ValueError(f"unknown accumulator mode {mode}")
        two_d = len(shape) == 2
        if parts is not None and (not two_d or parts[0] != 0 or parts[-1] != shape[0] or list(parts) != sorted(parts)):
            raise ValueError(f"row parts {parts} do not split a weight of shape {shape}")
        f32 = dict(dtype=torch.float32, device=device)
        cols_shape = (shape[-1],) if parts is None else (len(parts) - 1, shape[-1])
        return cls(
            mode=mode if two_d else "total",
            shape=shape,
            total=torch.zeros((), dtype=torch.float64, device=device),
            rows=torch.zeros(shape[0], **f32) if two_d and mode in ("full", "reduced") else None,
            cols=torch.zeros(cols_shape, **f32) if two_d and mode in ("full", "reduced", "cols") else None,
            full=torch.zeros(shape, dtype=map_dtype, device=device) if two_d and mode == "full" else None,
            parts=parts if two_d else None,
        )

    def role(self, rows: slice) -> ParamSensitivity:
        """The accumulators of one role's block of rows (``slice(None)``: the whole weight, itself)."""
        if rows == slice(None):
            return self
        bounds = list(self.parts or ())
        if rows.start not in bounds or rows.stop not in bounds or bounds.index(rows.stop) != bounds.index(rows.start) + 1:
            raise ValueError(f"rows {rows.start}:{rows.stop} are not one of the fused blocks {self.parts} of {self.shape}")
        i = bounds.index(rows.start)
        return ParamSensitivity(
            mode=self.mode,
            shape=(rows.stop - rows.start, *self.shape[1:]),
            total=self.rows[rows].sum(dtype=torch.float64) if self.rows is not None else self.total,
            rows=self.rows[rows] if self.rows is not None else None,
            cols=self.cols[i] if self.cols is not None else None,
            full=self.full[rows] if self.full is not None else None,
        )

    def to(self, device: torch.device | str) -> ParamSensitivity:
        """The same accumulators on ``device``."""
        for k in ("total", "rows", "cols", "full"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.to(device))
        return self

    def drop_map(self) -> None:
        self.full = None
        if self.mode == "full":
            self.mode = "reduced"

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"{name}::total": self.total.reshape(1)}
        for k in ("rows", "cols", "full"):
            v = getattr(self, k)
            if v is not None:
                out[f"{name}::{k}"] = v
        return out


def accumulate(
    acc: ParamSensitivity, weight: torch.Tensor, grad: torch.Tensor, chunk_elems: int = 1 << 18, row_offset: int = 0
) -> None:
    """Fold |weight · grad| of one sample into ``acc``.

    ``weight``/``grad`` may be a block of rows starting at ``row_offset`` of the accumulated matrix.
    Row chunks of ``chunk_elems`` keep the temporary small enough to stay in cache.
    """
    w, g = weight.detach(), grad.detach()
    dev = acc.total.device
    if w.dim() != 2:
        acc.total += (w.float() * g.float()).abs().sum(dtype=torch.float64).to(dev)
        return
    g = g.to(w.device)
    step = max(1, chunk_elems // max(1, w.shape[1]))
    for r in range(0, w.shape[0], step):
        s = (w[r : r + step].float() * g[r : r + step].float()).abs_()
        row_sums = s.sum(dim=1)
        acc.total += row_sums.sum(dtype=torch.float64).to(dev)
        lo, hi = row_offset + r, row_offset + r + s.shape[0]
        if acc.rows is not None:
            acc.rows[lo:hi] += row_sums.to(dev)
        if acc.cols is not None and acc.parts is None:
            acc.cols += s.sum(dim=0).to(dev)
        elif acc.cols is not None:  # a fused weight: each role's block of rows has its own column sums
            for i, (a, b) in enumerate(zip(acc.parts[:-1], acc.parts[1:], strict=True)):  # type: ignore[index]
                if a < hi and b > lo:
                    acc.cols[i] += s[max(a, lo) - lo : min(b, hi) - lo].sum(dim=0).to(dev)
        if acc.full is not None:
            acc.full[lo:hi] += s.to(dev, acc.full.dtype)


def accumulate_linear_from_io(
    acc: ParamSensitivity, weight: torch.Tensor, inputs: torch.Tensor, grad_out: torch.Tensor, chunk_rows: int = 4096
) -> None:
    """|W ∘ G| for a linear layer, with G = grad_outᵀ · inputs formed a block of output rows at a time."""
    x = inputs.reshape(-1, inputs.shape[-1]).float().to(weight.device)
    go = grad_out.reshape(-1, grad_out.shape[-1]).float().to(weight.device)
    for r in range(0, weight.shape[0], chunk_rows):
        accumulate(acc, weight[r : r + chunk_rows], go[:, r : r + chunk_rows].T @ x, row_offset=r)


def accumulate_embedding_rows(acc: ParamSensitivity, weight: torch.Tensor, ids: torch.Tensor, grad_out: torch.Tensor) -> None:
    """|W ∘ G| for an embedding: G is non-zero only on the rows of the tokens seen (summed per token)."""
    if acc.rows is not None or acc.full is not None:
        raise ValueError("embedding accumulators keep column sums and totals only")
    uniq, inverse = torch.unique(ids.reshape(-1).to(weight.device), return_inverse=True)
    g = torch.zeros(uniq.numel(), weight.shape[1], dtype=torch.float32, device=weight.device)
    g.index_add_(0, inverse, grad_out.reshape(-1, weight.shape[1]).float().to(weight.device))
    accumulate(acc, weight[uniq], g)  # rows of zero gradient add nothing


@dataclass
class Sensitivity:
    """Accumulated sensitivity of a model's parameters over ``n_samples`` seed samples."""

    params: dict[str, ParamSensitivity]
    n_samples: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def block_scores(self, prefix: str, n_layers: int) -> list[float]:
        """Sum of totals over each transformer block ``{prefix}.{i}.``."""
        scores = [0.0] * n_layers
        for name, p in self.params.items():
            if name.startswith(prefix + "."):
                i = int(name[len(prefix) + 1 :].split(".", 1)[0])
                scores[i] += float(p.total)
        return scores

    def module_totals(self) -> dict[str, float]:
        return {name: float(p.total) for name, p in self.params.items()}


class StreamingSensitivity:
    """Attach to a model; every backward then folds |θ·g| into accumulators and frees the gradients.

    ``vocab_modules`` (module name -> "embedding" or "linear") are handled with module hooks instead of
    parameter gradients, so their [vocab x hidden] gradient is never materialised.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mode_for: Callable[[str, tuple[int, ...]], str],
        map_dtype: torch.dtype = torch.float32,
        chunk_elems: int = 1 << 18,
        vocab_modules: dict[str, str] | None = None,
        row_parts: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.model = model
        self.chunk_elems = chunk_elems
        self.params: dict[str, ParamSensitivity] = {}
        self._handles: list[Any] = []
        self._frozen: list[torch.nn.Module] = []
        self.vocab_modules = dict(vocab_modules or {})
        self._patched: list[Any] = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                device = p.device if p.device.type != "meta" else torch.device("cpu")  # offloaded: kept on the CPU
                shape = tuple(p.shape)
                parts = (row_parts or {}).get(name)
                self.params[name] = ParamSensitivity.empty(shape, mode_for(name, shape), map_dtype, device, parts)

    def _attach_vocab(self, name: str, kind: str, module: torch.nn.Module) -> None:
        weight = module.weight
        acc = self.params[name + ".weight"]
        if weight.requires_grad:
            weight.requires_grad_(False)  # no dense [vocab x hidden] gradient
            self._frozen.append(module)
        if kind == "linear":
            saved: dict[str, torch.Tensor] = {}

            def fwd(mod: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
                saved["x"] = args[0].detach()

            def bwd(mod: Any, grad_in: Any, grad_out: tuple[torch.Tensor, ...]) -> None:
                accumulate_linear_from_io(acc, stored_value(mod).detach(), saved.pop("x"), grad_out[0])

            self._handles += [module.register_forward_hook(fwd), module.register_full_backward_hook(bwd)]
        else:

            def fwd_embed(mod: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
                ids = args[0]
                leaf = out.detach().requires_grad_(True)  # the backward must reach the embedding output
                leaf.register_hook(lambda g: accumulate_embedding_rows(acc, stored_value(mod).detach(), ids, g))
                return leaf

            self._handles.append(module.register_forward_hook(fwd_embed))

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        acc = self.params[name]

        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                accumulate(acc, param, param.grad, self.chunk_elems)
            param.grad = None  # free at once: no full gradient copy of the model

        return hook

    def __enter__(self) -> StreamingSensitivity:
        modules = dict(self.model.named_modules())
        for name, kind in self.vocab_modules.items():
            self._attach_vocab(name, kind, modules[name])
        for mname, module in modules.items():
            own = dict(module.named_parameters(recurse=False))
            full = {n: f"{mname}.{n}" if mname else n for n in own}  # the module's own name -> the model's
            hook = offload_hook(module)
            if hook is not None:
                self._watch_offloaded(hook, full)
                continue
            for local, p in own.items():
                if full[local] in self.params and p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(full[local])))
        return self

    def _watch_offloaded(self, hook: Any, names: dict[str, str]) -> None:
        """accelerate makes an offloaded module's parameters afresh on its execution device before each forward
        (in ``hook.pre_forward``): hook each new copy as it is made (the copy is what the backward accumulates into)."""
        original = hook.pre_forward

        def pre_forward(mod: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(mod, *args, **kwargs)
            for local, full in names.items():
                p = mod._parameters.get(local)
                if full in self.params and p is not None and p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._hook(full))  # dies with the copy
            return out

        hook.pre_forward = pre_forward
        self._patched.append(hook)

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for hook in self._patched:
            del hook.pre_forward  # back to the class's method
        self._patched.clear()
        for module in self._frozen:  # the module's weight now: an offloaded module's is a new object after each forward
            module.weight.requires_grad_(True)
        self._frozen.clear()


def sensitivity_over(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    mode_for: Callable[[str, tuple[int, ...]], str],
    *,
    map_dtype: torch.dtype = torch.float32,
    vocab_modules: dict[str, str] | None = None,
    row_parts: dict[str, tuple[int, ...]] | None = None,
    checkpointing: bool = False,
    on_sample: Callable[[float], None] | None = None,
) -> Sensitivity:
    """Run one forward+backward per batch (one seed sample each) and return the accumulated sensitivity.

    Dropout is always off (the gradient of the model as it is). ``checkpointing`` recomputes each
    layer's activations in the backward instead of keeping them (transformers only checkpoints in
    train mode, so the model runs in train mode with every dropout module switched to eval).
    ``row_parts``: parameter name -> row boundaries of a fused weight's roles (column sums kept per role).
    """
    import time

    was_training = model.training
    model.eval()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    n = 0
    try:
        with StreamingSensitivity(model, mode_for, map_dtype, vocab_modules=vocab_modules, row_parts=row_parts) as stream:
            for batch in batches:
                t0 = time.perf_counter()
                out = model(**batch)
                out.loss.backward()
                n += 1
                if on_sample:
                    on_sample(time.perf_counter() - t0)
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return Sensitivity({k: v.to("cpu") for k, v in stream.params.items()}, n)
