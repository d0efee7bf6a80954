"""The MMLU study's test items are disjoint from everything any entry trains, tunes or locates on."""

from __future__ import annotations

import sys

sys.path.insert(0, "tests")
from conftest import needs_data

from pktransfer.data import get_task, train_and_validation
from pktransfer.data.benchmarks import chat_row_question, question_key
from pktransfer.pipeline import _eval_items
from pktransfer.recipe import load_recipe


def _keys(items) -> set[str]:
    return {question_key(chat_row_question(it.prompt)) for it in items}


@needs_data
def test_mmlu_study_sets_are_disjoint():
    recipe = load_recipe("recipes/mmlu-study.yaml")
    task = get_task(recipe.task.name, recipe.task.params, recipe.task.data_dir)
    train, val = train_and_validation(task, recipe.task.n_train, recipe.task.validation)
    assert len(train) == 256 and len(val) == 100
    assert task.FILES["train"] == "laten/mmlu/mmlu_train_split.jsonl"  # the stated source
    assert not {it.id for it in train} & {it.id for it in val}
    test = _eval_items(task, "test", recipe)
    assert len(test) == 600 and len({it.id for it in test}) == 600
    test_keys = {question_key(it.metadata["question"]) for it in test}
    seen = _keys(train) | _keys(val) | _keys(task.split("seed")) | _keys(task.split("extract")) | _keys(task.split("align"))
    # the whole training file too (the part past n_train is never trained on, but excluding it costs nothing)
    seen |= _keys(task.split("train"))
    assert not test_keys & seen
    assert task.n_excluded == 49
    # the keys are real questions, not a shared header: the trained ones recover their question text
    assert "" not in seen and len(seen) > 1000


@needs_data
def test_validation_carved_from_paper_rows_is_scored_as_multiple_choice(tiny_models):
    """The tuning items are the papers' chat rows: scored by the letter their answer ends with, under the study's cue."""
    from pktransfer.data import PromptFormatter
    from pktransfer.evaluation.evaluate import evaluate_items
    from pktransfer.models import load_model
    from pktransfer.recipe import ModelSpec

    task = get_task("mmlu", {"style": "open-instruct", "train_source": "laten"})
    _, val = train_and_validation(task, 256, 100)
    assert [it.reference for it in val[:3]] == [it.response.rsplit(" ", 1)[1] for it in val[:3]]
    loaded = load_model(ModelSpec(model=str(tiny_models["qwen2_student"])))
    fmt = PromptFormatter(loaded.tokenizer, "chat")
    res = evaluate_items(loaded.model, fmt, val[:3], label="x", task=task, split="validation")
    assert res.summary["n"] == 3 and sum(res.summary["predicted"].values()) == 3
    assert all(r["model_input"].endswith("<|im_start|>assistant\nThe answer is:") for r in res.records)
    assert set(res.records[0]["loglik"]) == {"A", "B", "C", "D"}
