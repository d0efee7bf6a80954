"""The configs of the models the paper recipes name (recipes/papers/), for planning without the hub.

``pkt plan`` needs a model's shape, not its weights; the meta-llama repositories are gated, and these machines are
often offline. The values are those of each repository's ``config.json`` (the fields that set a shape; the chat
models share their base model's). Used only when the config cannot be read from a folder, the cache or the hub,
and the plan says so.
"""

from __future__ import annotations

from typing import Any

_LLAMA2 = {"model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
_7B = {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
       "num_key_value_heads": 32}  # fmt: skip
_13B = {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40,
        "num_key_value_heads": 40}  # fmt: skip

PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": _7B,
    "meta-llama/Llama-2-7b-chat-hf": _7B,
    "meta-llama/Llama-2-13b-hf": _13B,
    "meta-llama/Llama-2-13b-chat-hf": _13B,
}


def paper_config(name: str) -> Any | None:
    """The config of a paper model by its hub id (None for any other name)."""
    values = PAPER_CONFIGS.get(name)
    if values is None:
        return None
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)
