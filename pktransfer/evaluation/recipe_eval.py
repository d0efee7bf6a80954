"""What a recipe evaluates, and how: its items per split and its generation settings (shared by the pipeline,
planting and ``pkt plan``)."""

from __future__ import annotations

from pktransfer.data import Item, Task, train_and_validation
from pktransfer.errors import RecipeError
from pktransfer.evaluation.evaluate import EvalOptions, subset
from pktransfer.recipe import Recipe


def _eval_items(task: Task, split: str, recipe: Recipe) -> list[Item]:
    """The items a recipe evaluates: task.n_test caps the test split (its first N); evaluation.limit
    (with subset_seed, a seeded draw) applies to every split."""
    if split == "validation":
        if not recipe.task.validation:
            raise RecipeError(
                "evaluation.splits names 'validation' but task.validation is not set",
                hint="set task.validation: N (carved from the train split when the task has no validation split)",
            )
        items = train_and_validation(task, recipe.task.n_train, recipe.task.validation)[1]
        return subset(items, recipe.evaluation.limit, recipe.evaluation.subset_seed)
    items = task.split(split)
    if split == "test" and recipe.task.n_test:
        items = items[: recipe.task.n_test]
    return subset(items, recipe.evaluation.limit, recipe.evaluation.subset_seed)


def eval_options(
    recipe: Recipe, task: Task, source: str | None = None, device_type: str = "cpu", dtype: str = "auto"
) -> EvalOptions:
    """The evaluation settings of a recipe; ``source``: the folder the evaluated weights are in (vLLM loads it),
    ``device_type``: where the model is (``backend: auto`` takes vLLM on CUDA only), ``dtype``: the model's, which
    the vLLM engine keeps."""
    from pktransfer.evaluation import vllm_backend

    ev = recipe.evaluation
    backend = vllm_backend.resolve(ev.backend, device_type) if source is not None else "hf"
    return EvalOptions(
        batch_size=ev.batch_size,
        max_new_tokens=generation_budget(ev.max_new_tokens, task),
        n_samples=ev.n_samples,
        temperature=ev.temperature,
        top_p=ev.top_p,
        seed=recipe.seed,
        allow_code_execution=ev.allow_code_execution,
        backend=backend,
        vllm_source=source if backend == "vllm" else None,
        vllm_dtype=dtype,
        vllm_max_model_len=recipe.training.max_length + generation_budget(ev.max_new_tokens, task) + 2048,
    )


def generation_budget(explicit: int | None, task: Task) -> int:
    """New tokens to generate: the explicit setting, else the task's own budget, else 16."""
    return explicit or task.max_new_tokens or 16
