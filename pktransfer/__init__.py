"""pktransfer: cross-scale parametric knowledge transfer between language models.

Python API (mirrors the ``pkt`` CLI)::

    import pktransfer
    recipe = pktransfer.load_recipe("recipes/quickstart.yaml", overrides=["training.max_steps=10"])
    result = pktransfer.run(recipe)            # evaluate, transfer, train, evaluate, report
    result.metrics["trained"]["test"]["accuracy"]
    pktransfer.compare(pktransfer.load_recipe("recipes/quick-compare.yaml"))  # methods x seeds
    pktransfer.evaluate("builtin:qwen2.5-coder-0.5b-instruct", "arithmetic", limit=20)
"""

from __future__ import annotations

from typing import Any

from pktransfer.errors import DataError, IncompatiblePairError, ModelError, PktError, RecipeError
from pktransfer.models import load_model, prepare_builtin
from pktransfer.pipeline import RunResult, evaluate, extract, inject, run, set_threads, transport
from pktransfer.recipe import Recipe, load_recipe, recipe_from_dict

__version__ = "0.1.0"


def compare(recipe: Recipe, **kwargs: Any) -> Any:
    """Run (or resume) the recipe's methods x seeds grid; writes compare.md/.csv/.json and plots."""
    from pktransfer.study.grid import compare as _compare

    return _compare(recipe, **kwargs)


def diagnose(recipe: Recipe, **kwargs: Any) -> RunResult:
    """Measure, without training, whether each method's premise holds for the recipe's pair (pkt diagnose)."""
    from pktransfer.diagnosis import diagnose as _diagnose

    return _diagnose(recipe, **kwargs)


def plant(recipe: Recipe, **kwargs: Any) -> RunResult:
    """Fine-tune the teacher on every fact of a planted task (pkt plant): adapter, merged teacher and recall."""
    from pktransfer.planting import plant as _plant

    return _plant(recipe, **kwargs)


def train(recipe: Recipe, **kwargs: Any) -> RunResult:
    """Apply the recipe's method and train the student, without evaluations."""
    return run(recipe, evaluate=False, **kwargs)


__all__ = [
    "DataError",
    "IncompatiblePairError",
    "ModelError",
    "PktError",
    "Recipe",
    "RecipeError",
    "RunResult",
    "__version__",
    "compare",
    "diagnose",
    "evaluate",
    "extract",
    "inject",
    "load_model",
    "load_recipe",
    "plant",
    "prepare_builtin",
    "recipe_from_dict",
    "run",
    "set_threads",
    "train",
    "transport",
]
