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
    """

    norms: dict[str, tuple[str, str]]
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
}
SUPPORTED_FAMILIES = tuple(FAMILIES)

# Families users ask for that pktransfer cannot handle yet, with the reason (one clear error instead of a crash).
UNSUPPORTED_FAMILIES = {
    "phi3": "Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj; per-role selection and injection "
    "inside a fused matrix is not implemented yet",
}


@dataclass(frozen=True)
class WeightInfo:
    role: str
    module: str
    in_space: str
    out_space: str
    shape: tuple[int, ...]


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
        path = _PROJECTIONS[role][0] if role in _PROJECTIONS else self.spec.norms[role][0]
        return f"{self.layers_path}.{layer}.{path}"

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
        for role, (path, ins, outs) in _PROJECTIONS.items():
            shape = (self.space_size(outs), self.space_size(ins))
            out.append(WeightInfo(role, f"{self.layers_path}.{layer}.{path}", ins, outs, shape))
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
        d["roles"] = {r: {"module": p, "in": i, "out": o} for r, (p, i, o) in _PROJECTIONS.items()}
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
