"""Model loading, the offline builtin pair, and architecture descriptions."""

from pktransfer.models.arch import ArchitectureDescription, describe, describe_config
from pktransfer.models.builtin import BUILTIN_MODELS, DEFAULT_STUDENT, DEFAULT_TEACHER, cache_dir, prepare_builtin
from pktransfer.models.loading import LoadedModel, load_config, load_model, resolve_device, resolve_dtype

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_STUDENT",
    "DEFAULT_TEACHER",
    "ArchitectureDescription",
    "LoadedModel",
    "cache_dir",
    "describe",
    "describe_config",
    "load_config",
    "load_model",
    "prepare_builtin",
    "resolve_device",
    "resolve_dtype",
]
