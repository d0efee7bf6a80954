"""Architecture description of a loaded decoder model.

For every weight the description names its role (embeddings, q/k/v/o, gate/up/down, norms, lm_head),
its module path, and which space its input and output live in (residual stream, attention heads,
key/value heads, MLP). Methods that select or map indices across teacher and student rely on these
spaces to make consistent choices for every tensor that shares a dimension.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pktransfer.errors import ModelError

# Projections every supported family shares: role -> (module path in a block, input space, output space);
# weights are [out, in] as in nn.Linear.
_PROJECTIONS: dict[str, tuple[str, str, str]] = {
    "q": ("self_attn.q_proj", "residual", "heads"),
    "k": ("self_attn.k_proj", "residual", "kv_heads"),
    "v": ("self_attn.v_proj", "residual", "kv_heads"),
    "o": ("self_attn.o_proj", "heads", "residual"),
    "gate": ("mlp.gate_proj", "residual", "mlp"),
    "up": ("mlp.up_proj", "residual", "mlp"),
    "down": ("mlp.down_proj", "mlp", "residual"),
}
# Phi-3 fuses q/k/v into one matrix and gate/up into another: roles sharing a module path occupy consecutive
# blocks of its output rows, in the order listed here (what transformers' Phi3Attention / Phi3MLP split).
_FUSED_PROJECTIONS: dict[str, tuple[str, str, str]] = {
    **_PROJECTIONS,
    "q": ("self_attn.qkv_proj", "residual", "heads"),
    "k": ("self_attn.qkv_proj", "residual", "kv_heads"),
    "v": ("self_attn.qkv_proj", "residual", "kv_heads"),
    "gate": ("mlp.gate_up_proj", "residual", "mlp"),
    "up": ("mlp.gate_up_proj", "residual", "mlp"),
}
ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("gate", "up", "down")

# Norm roles: the norm before attention, before the MLP (pre-norm families), and after each sublayer's output
# (post-norm families: Gemma 2/3 have both, OLMo-2 only post-norms), and the per-head q/k norms.
_PRE_NORMS = {"input_norm": ("input_layernorm", "residual"), "pre_mlp_norm": ("post_attention_layernorm", "residual")}
_SANDWICH_NORMS = {
    "input_norm": ("input_layernorm", "residual"),
    "post_attention_norm": ("post_attention_layernorm", "residual"),
    "pre_mlp_norm": ("pre_feedforward_layernorm", "residual"),
    "post_mlp_norm": ("post_feedforward_layernorm", "residual"),
}
_QK_HEAD_NORMS = {"q_norm": ("self_attn.q_norm", "head"), "k_norm": ("self_attn.k_norm", "head")}


@dataclass(frozen=True)
class Family:
    """One decoder family, declaratively (after mergekit's architecture definitions): adding a family is a new
    entry here plus its tiny-model tests, not code in every method.

    ``attention_out`` / ``mlp_out``: the module (in a block) whose output is the sublayer's contribution to the
    residual stream — the sublayer itself for pre-norm families, its post-norm for Gemma 2/3 and OLMo-2.
    ``post_norm_offset``: a post-norm computes x / rms(x) · (offset + weight) (Gemma stores weight − 1).
    ``logit_softcap``: the config attribute holding the final logit soft-cap (logits = c · tanh(logits / c)).
    ``projections``: role -> (module path in a block, input space, output space). Roles that share a module
    path are fused: each holds a block of the module's output rows, in the order of this table.
    """

    norms: dict[str, tuple[str, str]]
    projections: dict[str, tuple[str, str, str]] = field(default_factory=lambda: dict(_PROJECTIONS))
    attention_out: str = "self_attn"
    mlp_out: str = "mlp"
    post_norm_offset: float = 0.0
    logit_softcap: str | None = None
    notes: str = ""


_GEMMA2 = Family(
    _SANDWICH_NORMS,
    attention_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    post_norm_offset=1.0,
    logit_softcap="final_logit_softcapping",
    notes="scaled embeddings (x sqrt(hidden), inside the embedding module), sandwich norms, logit soft-capping",
)

FAMILIES: dict[str, Family] = {
    "llama": Family(_PRE_NORMS, notes="Llama 2/3.x (3.2 ties its embeddings)"),
    "mistral": Family(_PRE_NORMS),
    "qwen2": Family(_PRE_NORMS, notes="Qwen2 and Qwen2.5 (q/k/v biases)"),
    "qwen3": Family({**_PRE_NORMS, **_QK_HEAD_NORMS}, notes="per-head q/k norms; head_dim set independently"),
    "gemma2": _GEMMA2,
    "gemma3_text": replace(
        _GEMMA2,
        norms={**_SANDWICH_NORMS, **_QK_HEAD_NORMS},
        notes="Gemma 3 text models: as Gemma 2 plus per-head q/k norms",
    ),
    "olmo2": Family(
        {
            "post_attention_norm": ("post_attention_layernorm", "residual"),
            "post_mlp_norm": ("post_feedforward_layernorm", "residual"),
            "q_norm": ("self_attn.q_norm", "heads"),
            "k_norm": ("self_attn.k_norm", "kv_heads"),
        },
        attention_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        notes="post-norms only (no norm before attention or MLP); q/k norms over the full projection",
    ),
    "phi3": Family(
        _PRE_NORMS,
        projections=_FUSED_PROJECTIONS,
        notes="Phi-3/3.5 and Phi-4-mini: q/k/v fused in qkv_proj, gate/up in gate_up_proj (a LoRA targets the "
        "fused module; selection and injection work per role inside it)",
    ),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)

# Families users ask for that pktransfer cannot handle yet, with the reason (one clear error instead of a crash).
UNSUPPORTED_FAMILIES = {
    "mixtral": "its FFN is a mixture of experts (per-expert w1/w2/w3 behind a router); no method maps experts yet",
    "phi": "Phi-1/Phi-2 run attention and MLP in parallel from one LayerNorm with biases (dense/fc1/fc2), "
    "a layout no method maps yet",
}


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


# Module leaf name -> the roles its weight holds, over every family (a fused leaf holds several).
ROLES_OF_LEAF: dict[str, tuple[str, ...]] = {}
for _fam in FAMILIES.values():
    for _role, (_path, _, _) in _fam.projections.items():
        _roles = ROLES_OF_LEAF.setdefault(_leaf(_path), ())
        if _role not in _roles:
            ROLES_OF_LEAF[_leaf(_path)] = (*_roles, _role)
ROLES_OF_LEAF |= {"embed_tokens": ("embed",), "lm_head": ("lm_head",)}
# the canonical (unfused) leaf name of every projection role: what recipes name in lora.target_modules
CANONICAL_LEAF = {role: _leaf(path) for role, (path, _, _) in _PROJECTIONS.items()}


def family_leaf(family: str, name: str) -> str:
    """The module leaf that holds the role a canonical name (``q_proj``…) stands for in ``family`` (its fused
    module where the family fuses it); any other name is returned as it is."""
    for role, (path, _, _) in FAMILIES[family].projections.items():
        if CANONICAL_LEAF[role] == name:
            return _leaf(path)
    return name


def _fused_members(family: str, leaf: str) -> list[str]:
    """The canonical names a module leaf of ``family`` fuses (one name for an unfused module)."""
    return [CANONICAL_LEAF[r] for r, (p, _, _) in FAMILIES[family].projections.items() if _leaf(p) == leaf]


def lora_targets(family: str, names: list[str]) -> list[str]:
    """The module leaf names a LoRA must target in ``family`` for ``names``, written with the canonical
    per-role names (``q_proj``…) or the family's own (``qkv_proj``). One LoRA covers a whole fused matrix, so
    naming one of its roles targets all of them (``widened_targets`` says which were added)."""
    out: list[str] = []
    for name in names:
        leaf = family_leaf(family, name)
        if leaf not in out:
            out.append(leaf)
    return out


def widened_targets(family: str, names: list[str]) -> dict[str, list[str]]:
    """Fused module -> the roles a LoRA on it covers that ``names`` did not name (empty: none widened)."""
    out: dict[str, list[str]] = {}
    for leaf in lora_targets(family, names):
        missing = [m for m in _fused_members(family, leaf) if m not in names and leaf not in names]
        if missing and len(_fused_members(family, leaf)) > 1:
            out[leaf] = missing
    return out


def lora_ranks(family: str, pattern: dict[str, int]) -> dict[str, int]:
    """A LoRA rank pattern keyed by ``family``'s module leaves; the roles of a fused module must agree."""
    out: dict[str, int] = {}
    for name, r in pattern.items():
        leaf = family_leaf(family, name)
        members = _fused_members(family, leaf)
        if leaf != name and len(members) > 1 and any(pattern.get(m) != r for m in members):
            raise ValueError(f"{family} fuses {'/'.join(members)} into {leaf}: one rank for all of them, or key it {leaf}")
        out[leaf] = r
    return out


@dataclass(frozen=True)
class WeightInfo:
    """One role's weight: ``shape`` is the role's own; ``rows`` the block of the module's output rows it holds
    when the module is fused (None: the whole weight)."""

    role: str
    module: str
    in_space: str
    out_space: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None


@dataclass
class ArchitectureDescription:
    family: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    attention_bias: bool
    layers_path: str = "model.layers"
    embed_module: str = "model.embed_tokens"
    final_norm_module: str = "model.norm"
    lm_head_module: str = "lm_head"
    n_parameters: int = 0
    logit_softcap: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- spaces and shapes ------------------------------------------------------------------
    def space_size(self, space: str) -> int:
        return {
            "residual": self.hidden_size,
            "heads": self.n_heads * self.head_dim,
            "head": self.head_dim,
            "kv_heads": self.n_kv_heads * self.head_dim,
            "mlp": self.intermediate_size,
            "vocab": self.vocab_size,
        }[space]

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    def module_name(self, layer: int, role: str) -> str:
        """The module holding ``role``'s weight in block ``layer`` (a fused module holds several roles)."""
        projections = self.spec.projections
        path = projections[role][0] if role in projections else self.spec.norms[role][0]
        return f"{self.layers_path}.{layer}.{path}"

    def role_rows(self, role: str) -> slice:
        """The rows of its module's weight that ``role`` holds: all of them unless the module is fused."""
        projections = self.spec.projections
        if role not in projections:
            return slice(None)
        path, start = projections[role][0], 0
        for r, (p, _, out) in projections.items():
            if p == path:
                if r == role:
                    stop = start + self.space_size(out)
                    return slice(None) if start == 0 and stop == self.module_rows(role) else slice(start, stop)
                start += self.space_size(out)
        raise AssertionError(role)

    def module_rows(self, role: str) -> int:
        """Output rows of the projection module holding ``role``: the sum over the roles it holds."""
        path = self.spec.projections[role][0]
        return sum(self.space_size(out) for p, _, out in self.spec.projections.values() if p == path)

    def role_weight(self, model: Any, layer: int, role: str) -> Any:
        """``role``'s weight in block ``layer`` of ``model`` (detached; its rows of a fused module; an offloaded
        module's stored copy)."""
        from pktransfer.ops.offload import stored_value

        return stored_value(model.get_submodule(self.module_name(layer, role))).detach()[self.role_rows(role)]

    def fused_parts(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> row boundaries of its roles, for every fused projection weight."""
        out = {}
        for layer in range(self.n_layers):
            for w in self.layer_weights(layer):
                if w.rows is not None:
                    bounds = out.setdefault(f"{w.module}.weight", (0,))
                    out[f"{w.module}.weight"] = (*bounds, w.rows[1])
        return out

    def sublayer_name(self, layer: int, point: str) -> str:
        """The module whose output is layer ``layer``'s (0-based) contribution at ``point``: ``attention`` or
        ``mlp`` (after its post-norm where the family has one), or the whole ``layer``."""
        block = f"{self.layers_path}.{layer}"
        return {"attention": f"{block}.{self.spec.attention_out}", "mlp": f"{block}.{self.spec.mlp_out}", "layer": block}[point]

    @property
    def post_norms(self) -> bool:
        return self.spec.mlp_out != "mlp"

    def layer_weights(self, layer: int) -> list[WeightInfo]:
        out = []
        for role, (path, ins, outs) in self.spec.projections.items():
            shape = (self.space_size(outs), self.space_size(ins))
            rows = self.role_rows(role)
            span = None if rows.start is None else (rows.start, rows.stop)
            out.append(WeightInfo(role, f"{self.layers_path}.{layer}.{path}", ins, outs, shape, span))
        for role, (path, space) in self.spec.norms.items():
            out.append(WeightInfo(role, f"{self.layers_path}.{layer}.{path}", space, space, (self.space_size(space),)))
        return out

    def global_weights(self) -> list[WeightInfo]:
        v, h = self.vocab_size, self.hidden_size
        return [
            WeightInfo("embed", self.embed_module, "vocab", "residual", (v, h)),
            WeightInfo("final_norm", self.final_norm_module, "residual", "residual", (h,)),
            WeightInfo("lm_head", self.lm_head_module, "residual", "vocab", (v, h)),
        ]

    def weights(self) -> list[WeightInfo]:
        out = self.global_weights()
        for i in range(self.n_layers):
            out.extend(self.layer_weights(i))
        return out

    @property
    def layer_names(self) -> list[str]:
        return [f"{self.layers_path}.{i}" for i in range(self.n_layers)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roles"] = {
            r: {
                "module": p,
                "in": i,
                "out": o,
                **({"rows": [s.start, s.stop]} if (s := self.role_rows(r)).start is not None else {}),
            }
            for r, (p, i, o) in self.spec.projections.items()
        }
        d["norms"] = {r: p for r, (p, _) in self.spec.norms.items()}
        return d

    def summary(self) -> str:
        return (
            f"{self.family}: {self.n_layers} layers, hidden {self.hidden_size}, FFN {self.intermediate_size}, "
            f"{self.n_heads} heads / {self.n_kv_heads} kv heads x {self.head_dim}, vocab {self.vocab_size}, "
            f"{'tied' if self.tied_embeddings else 'untied'} embeddings, {self.n_parameters / 1e6:.1f}M parameters"
        )


def check_family(config: Any, where: str) -> str:
    family = getattr(config, "model_type", None) or "unknown"
    if family in UNSUPPORTED_FAMILIES:
        raise ModelError(
            f"model {where} is a '{family}' model, which pktransfer cannot handle yet: {UNSUPPORTED_FAMILIES[family]}",
            hint=f"pick a pair from a supported family: {', '.join(SUPPORTED_FAMILIES)}",
        )
    if family not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"unsupported architecture '{family}' for model {where}",
            hint=f"pktransfer supports decoder families: {', '.join(SUPPORTED_FAMILIES)}",
        )
    return family


def describe_config(config: Any, where: str = "", n_parameters: int = 0) -> ArchitectureDescription:
    """Describe a config of a supported family (no weights needed)."""
    family = check_family(config, where)
    spec = FAMILIES[family]
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ArchitectureDescription(
        family=family,
        n_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(config, "attention_bias", family == "qwen2")),
        n_parameters=n_parameters,
        logit_softcap=getattr(config, spec.logit_softcap, None) if spec.logit_softcap else None,
    )


def describe(model: Any) -> ArchitectureDescription:
    """Describe a loaded model, checking that the expected modules exist."""
    n_params = sum(p.numel() for p in model.parameters())
    desc = describe_config(model.config, getattr(model.config, "_name_or_path", ""), n_params)
    modules = dict(model.named_modules())
    missing = [
        m
        for m in (
            desc.embed_module,
            desc.final_norm_module,
            desc.lm_head_module,
            desc.module_name(0, "q"),
            desc.sublayer_name(0, "attention"),
            desc.sublayer_name(0, "mlp"),
        )
        if m not in modules
    ]
    if missing:
        raise ModelError(
            f"model {model.config._name_or_path!r} of family '{desc.family}' lacks expected modules {missing}",
            hint="the checkpoint does not follow the standard transformers layout for this family",
        )
    desc.tied_embeddings = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return desc
