"""Tied input/output embeddings (``tie_word_embeddings: true``: Llama-3.2, Qwen2.5 0.5-3B, Gemma...).

A tied model holds one matrix for ``embed_tokens`` and ``lm_head``. ``named_parameters()`` lists it once
(under the embedding's name), and anything written into it (a LoRA start subtracted from the base, a
merged LoRA delta) moves both uses. pktransfer therefore:

- reads a module's weight through the module, and its sensitivity under the name the shared parameter
  has (:func:`parameter_key`), so a tied teacher works for every target set;
- unties a tied *student* (:func:`untie`) before a method injects into or trains a LoRA on
  ``embed_tokens`` or ``lm_head``: ``lm_head`` gets its own copy of the matrix and the config says
  ``tie_word_embeddings: false``. The function is unchanged; saved full models (``residual/``,
  ``merged/``) then carry both matrices, vocabulary x hidden more parameters on disk (Qwen2.5-0.5B:
  151,936 x 896 = 136M, 272 MB in bfloat16). A saved adapter applies to the original tied student as
  long as it is not merged into it (merging an ``embed_tokens`` LoRA into a shared matrix would move
  ``lm_head`` too); a run's ``merged/`` folder is the correct merged model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

VOCAB_LEAVES = ("embed_tokens", "lm_head")


def is_tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def parameter_key(model: Any, module: str) -> str:
    """The name under which ``module``'s weight appears in ``named_parameters()`` (a tied ``lm_head``
    appears under the embedding's name)."""
    weight = model.get_submodule(module).weight
    for name, p in model.named_parameters(remove_duplicate=True):
        if p is weight:
            return name
    raise KeyError(f"{module}.weight is not a parameter of the model")


def _set_untied_config(config: Any) -> None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def untie(model: Any) -> bool:
    """Give ``lm_head`` its own copy of a tied embedding matrix (same values); True when it was tied."""
    if not is_tied(model):
        return False
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    _set_untied_config(model.config)
    if hasattr(model, "_tied_weights_keys"):  # transformers must not re-tie on save or load
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return True


def untie_if_targeted(loaded: Any, target_modules: Iterable[str], log: Callable[[str], None] | None = None) -> bool:
    """Untie the student when a LoRA (or an injection) targets ``embed_tokens`` or ``lm_head``."""
    if not any(t in VOCAB_LEAVES for t in target_modules) or not untie(loaded.model):
        return False
    loaded.arch.tied_embeddings = False
    if log:
        log(
            f"{loaded.name}: untied lm_head from embed_tokens (LoRA targets the vocabulary matrices); saved full "
            "models carry both matrices"
        )
    return True
