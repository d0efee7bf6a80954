"""Tasks, items, splits and prompt formatting."""

from pktransfer.data import arithmetic, benchmarks, local, planted  # noqa: F401  (register the built-in tasks)
from pktransfer.data.formatting import IGNORE_INDEX, TULU_VARIANTS, Example, PromptFormatter, encode_items, recipe_formatter
from pktransfer.data.tasks import SPLITS, Item, Task, get_task, register_task, resolve_data_dir, task_names, train_and_validation

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "TULU_VARIANTS",
    "Example",
    "Item",
    "PromptFormatter",
    "Task",
    "encode_items",
    "get_task",
    "recipe_formatter",
    "register_task",
    "resolve_data_dir",
    "task_names",
    "train_and_validation",
]
