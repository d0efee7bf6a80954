"""Architecture description of a loaded decoder model.

For every weight the description names its role (embeddings, q/k/v/o, gate/up/down, norms, lm_head),
its module path, and which space its input and output live in (residual stream, attention heads,
key/value heads, MLP). Methods that select or map indices across teacher and student rely on these
spaces to make consistent choices for every tensor that shares a dimension.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pktransfer.errors import ModelError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

# role -> (module path template, input space, output space); weights are [out, in] as in nn.Linear.
_LAYER_ROLES: dict[str, tuple[str, str, str]] = {
    "q": ("self_attn.q_proj", "residual", "heads"),
    "k": ("self_attn.k_proj", "residual", "kv_heads"),
    "v": ("self_attn.v_proj", "residual", "kv_heads"),
    "o": ("self_attn.o_proj", "heads", "residual"),
    "gate": ("mlp.gate_proj", "residual", "mlp"),
    "up": ("mlp.up_proj", "residual", "mlp"),
    "down": ("mlp.down_proj", "mlp", "residual"),
    "input_norm": ("input_layernorm", "residual", "residual"),
    "post_attention_norm": ("post_attention_layernorm", "residual", "residual"),
}
ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("gate", "up", "down")
NORM_ROLES = ("input_norm", "post_attention_norm")


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
    extra: dict[str, Any] = field(default_factory=dict)

    # -- spaces and shapes ------------------------------------------------------------------
    def space_size(self, space: str) -> int:
        return {
            "residual": self.hidden_size,
            "heads": self.n_heads * self.head_dim,
            "kv_heads": self.n_kv_heads * self.head_dim,
            "mlp": self.intermediate_size,
            "vocab": self.vocab_size,
        }[space]

    def module_name(self, layer: int, role: str) -> str:
        return f"{self.layers_path}.{layer}.{_LAYER_ROLES[role][0]}"

    def layer_weights(self, layer: int) -> list[WeightInfo]:
        out = []
        for role, (path, ins, outs) in _LAYER_ROLES.items():
            shape = (self.space_size(outs),) if role in NORM_ROLES else (self.space_size(outs), self.space_size(ins))
            out.append(WeightInfo(role, f"{self.layers_path}.{layer}.{path}", ins, outs, shape))
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
        d["roles"] = {r: {"module": p, "in": i, "out": o} for r, (p, i, o) in _LAYER_ROLES.items()}
        return d

    def summary(self) -> str:
        return (
            f"{self.family}: {self.n_layers} layers, hidden {self.hidden_size}, FFN {self.intermediate_size}, "
            f"{self.n_heads} heads / {self.n_kv_heads} kv heads x {self.head_dim}, vocab {self.vocab_size}, "
            f"{'tied' if self.tied_embeddings else 'untied'} embeddings, {self.n_parameters / 1e6:.1f}M parameters"
        )


def check_family(config: Any, where: str) -> str:
    family = getattr(config, "model_type", None) or "unknown"
    if family not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"unsupported architecture '{family}' for model {where}",
            hint=f"pktransfer supports decoder families: {', '.join(SUPPORTED_FAMILIES)}",
        )
    return family


def describe_config(config: Any, where: str = "", n_parameters: int = 0) -> ArchitectureDescription:
    """Describe a Llama/Qwen2/Qwen3/Mistral config (no weights needed)."""
    family = check_family(config, where)
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
    )


def describe(model: Any) -> ArchitectureDescription:
    """Describe a loaded model, checking that the expected modules exist."""
    n_params = sum(p.numel() for p in model.parameters())
    desc = describe_config(model.config, getattr(model.config, "_name_or_path", ""), n_params)
    modules = dict(model.named_modules())
    missing = [
        m for m in (desc.embed_module, desc.final_norm_module, desc.lm_head_module, desc.module_name(0, "q")) if m not in modules
    ]
    if missing:
        raise ModelError(
            f"model {model.config._name_or_path!r} of family '{desc.family}' lacks expected modules {missing}",
            hint="the checkpoint does not follow the standard transformers layout for this family",
        )
    desc.tied_embeddings = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return desc
