"""What a comparison reports beyond accuracy: teacher cost per entry, reruns, learning curves, matched ablations."""

from __future__ import annotations

import json

import pytest
import torch

import pktransfer
from pktransfer.recipe import recipe_from_dict
from pktransfer.study.analysis import teacher_cost_per_entry


def test_cells_tuning_and_an_equal_share_of_shared_work_by_hand():
    t = lambda f, s: {"forward_tokens": f, "backward_tokens": 0, "seconds": s, "flops": 2.0 * f}  # noqa: E731
    records = [{"label": "kd", "teacher": t(0, 0.0)}, {"label": "seeking", "teacher": t(0, 0.0)}]
    tuning = [{"label": "kd", "teacher": t(1000, 4.0)}, {"label": "kd", "teacher": t(0, 0.0)}]
    shared = {"/g/shared/seeking-x": {"seeking", "seeking+gkd"}}
    cost = teacher_cost_per_entry(records, tuning, shared, {"/g/shared/seeking-x": 60.0}, {"/g/shared/seeking-x": t(300, 50.0)})
    assert cost["kd"]["forward_tokens"] == 1000 and cost["kd"]["seconds"] == 4.0  # the cache, built in a tuning cell
    assert cost["seeking"]["forward_tokens"] == 150 and cost["seeking"]["shared_seconds"] == 25.0
    assert cost["seeking+gkd"]["seconds"] == 25.0
    # a shared record from before its teacher work was counted: its wall time stands in, split the same way
    old = teacher_cost_per_entry([], [], shared, {"/g/shared/seeking-x": 60.0}, {"/g/shared/seeking-x": {}})
    assert old["seeking"]["seconds"] == 30.0 and old["seeking"]["forward_tokens"] == 0


def test_a_grid_counts_kds_cache_and_splits_a_shared_sensitivity(tiny_recipe, tmp_path):
    tiny_recipe["task"]["validation"] = 4
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["compare"] = {
        "methods": [
            "lora",
            {"name": "kd", "tune": {"key": "training.lr", "values": [1e-3, 5e-4]}},
            {"name": "seeking", "n_seed": 3},
            {"name": "compose", "start": {"name": "seeking", "n_seed": 3}, "objective": {"name": "kd"}},
        ],
        "seeds": [0],
    }
    res = pktransfer.compare(recipe_from_dict(tiny_recipe), quiet=True)
    cost = res.result["teacher_cost"]
    assert cost["lora"]["forward_tokens"] == 0
    # KD's logits cache, built by a tuning cell, is read by kd and by seeking+kd's objective: half its cost each
    (cache,) = res.result["teacher_caches"].values()
    assert sorted(cache["users"]) == ["kd", "seeking+kd"] and cache["cost"]["forward_tokens"] > 0
    assert cost["kd"]["forward_tokens"] == pytest.approx(cache["cost"]["forward_tokens"] / 2)
    assert len([f for f in res.result["shared_work_seconds"] if "seeking-" in f]) == 1  # one sensitivity for both
    half_cache = round(cache["cost"]["seconds"], 2) / 2
    assert cost["seeking+kd"]["shared_seconds"] == pytest.approx(cost["seeking"]["shared_seconds"] + half_cache)
    assert cost["seeking"]["backward_tokens"] > 0  # the sensitivity's backward passes, half of them
    md = (res.output_dir / "compare.md").read_text()
    assert "Teacher cost per method, whole comparison" in md
    # the report names shared work by its folder under the output root, never by this machine's path
    assert all(f.startswith("shared/seeking-") for f in res.result["shared_work_seconds"])
    shared_path = str(res.output_dir / "shared")
    assert shared_path not in md and shared_path not in (res.output_dir / "compare.json").read_text()


def test_a_rerun_after_results_were_recorded_is_kept_in_the_record_and_reported(tiny_recipe, tmp_path):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["compare"] = {"methods": ["lora", "pissa"], "seeds": [0]}
    records = tmp_path / "records"
    first = pktransfer.compare(recipe_from_dict(tiny_recipe), quiet=True, records=records)
    assert first.result["reruns"] == [] and "### Reruns" not in (first.output_dir / "compare.md").read_text()
    again = pktransfer.compare(recipe_from_dict(tiny_recipe), quiet=True, records=records, overwrite=True)
    reruns = again.result["reruns"]
    assert [(r["label"], r["seed"]) for r in reruns] == [("lora", 0), ("pissa", 0)]
    assert reruns[0]["earlier"][0]["metrics"]["test"] == first.result["cells"][0]["metrics"]["test"]
    assert "### Reruns" in (again.output_dir / "compare.md").read_text()
    assert (records / "cells" / "lora" / "seed-0" / "reruns.json").is_file()


def test_the_learning_curve_scores_validation_at_each_third_without_changing_training(tiny_recipe, tmp_path):
    from safetensors.torch import load_file

    tiny_recipe["task"]["validation"] = 4
    tiny_recipe["training"]["max_steps"] = 6
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    plain = pktransfer.run(recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "plain")}), quiet=True)
    curved = recipe_from_dict(
        {**tiny_recipe, "evaluation": {**tiny_recipe["evaluation"], "learning_curve": 3}, "output_dir": str(tmp_path / "c")}
    )
    res = pktransfer.run(curved, quiet=True)
    points = res.run["training"]["learning_curve"]
    assert [p["step"] for p in points] == [2, 4, 6] and all(0 <= p["validation"] <= 1 for p in points)
    a, b = (
        load_file(str(plain.output_dir / "adapter/adapter_model.safetensors")),
        load_file(str(res.output_dir / "adapter/adapter_model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)  # scoring along the way drew no random numbers
    # the last point is the trained adapter's validation accuracy, as the run's own evaluation measured it
    tiny_recipe["evaluation"]["splits"] = ["validation"]
    final = pktransfer.run(recipe_from_dict({**tiny_recipe, "output_dir": str(tmp_path / "v")}), quiet=True)
    assert points[-1]["validation"] == final.metrics["trained"]["validation"]["accuracy"]
    import pytest as _pytest

    from pktransfer.errors import RecipeError

    no_val = {
        **tiny_recipe,
        "task": {**tiny_recipe["task"], "validation": None},
        "evaluation": {**tiny_recipe["evaluation"], "splits": ["test"], "learning_curve": 3},
    }
    with _pytest.raises(RecipeError, match=r"task\.validation"):
        pktransfer.run(recipe_from_dict({**no_val, "output_dir": str(tmp_path / "n")}), quiet=True)


def test_matched_pairs_run_each_entry_at_the_others_tuned_values_outside_the_family(tiny_recipe, tmp_path):
    from pktransfer.study.analysis import contrast

    tiny_recipe["task"]["validation"] = 4
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["compare"] = {
        "methods": [
            {"name": "lora", "tune": {"key": "training.lr", "values": [1e-3]}},
            {"name": "pissa", "tune": {"key": "training.lr", "values": [5e-4]}},
            "kd",
        ],
        "seeds": [0],
        "baseline": "kd",
        "matched": [["lora", "pissa"]],
    }
    res = pktransfer.compare(recipe_from_dict(tiny_recipe), quiet=True)
    labels = res.result["summary"]["labels"]
    assert "lora[lr=0.0005]" in labels and "pissa[lr=0.001]" in labels
    assert res.result["secondary"] == ["lora[lr=0.0005]", "pissa[lr=0.001]"]
    assert res.result["summary"]["family"]["test"]["comparisons"] == 2  # lora and pissa against kd, not the extras
    assert contrast(res.output_dir, "lora", "pissa")["also_differ"] == {"training.lr": [1e-3, 5e-4]}
    assert contrast(res.output_dir, "lora[lr=0.0005]", "pissa")["also_differ"] == {}
    from pktransfer.errors import RecipeError

    with pytest.raises(RecipeError, match=r"compare\.matched"):
        bad = {**tiny_recipe, "compare": {**tiny_recipe["compare"], "matched": [["lora", "nope"]]}}
        pktransfer.compare(recipe_from_dict({**bad, "output_dir": str(tmp_path / "bad")}), quiet=True)


def test_letter_distribution_of_the_untouched_models_by_hand():
    from pktransfer.reports import letter_distribution

    result = {
        "base": {
            "teacher": {"test": {"n": 4, "accuracy": 0.5, "predicted": {"A": 1, "B": 3, "C": 0, "D": 0},
                                 "reference_counts": {"A": 1, "B": 1, "C": 1, "D": 1}}},
            "student": {"test": {"n": 4, "accuracy": 0.25, "predicted": {"A": 0, "B": 4, "C": 0, "D": 0},
                                 "reference_counts": {"A": 1, "B": 1, "C": 1, "D": 1}}},
        }
    }  # fmt: skip
    lines = letter_distribution(result)
    assert "| teacher | test | 1 | 3 | 0 | 0 |" in lines and "| student | test | 0 | 4 | 0 | 0 |" in lines
    assert "| (true answers) | | 1 | 1 | 1 | 1 |" in lines
    # trained entries: summed over their seeds, after the untouched models
    result["cells"] = [
        {"label": "lora", "seed": 0, "predicted": {"test": {"A": 0, "B": 1, "C": 0, "D": 3}}},
        {"label": "lora", "seed": 1, "predicted": {"test": {"A": 1, "B": 0, "C": 0, "D": 3}}},
        {"label": "kd", "seed": 0, "metrics": {"test": 0.5}},  # a record made before the counts were kept
    ]
    lines = letter_distribution(result)
    assert lines.index("| lora (2 seeds) | test | 1 | 1 | 0 | 6 |") > lines.index("| student | test | 0 | 4 | 0 | 0 |")
    assert not any(line.startswith("| kd") for line in lines)
    assert letter_distribution({"base": {"student": {"test": {"n": 4, "accuracy": 0.5}}}}) == []  # generation tasks


def test_a_multiple_choice_grid_reports_each_entrys_predicted_letters(tiny_recipe, tmp_path):
    """On MMLU the report counts the letters each trained entry predicts (from its cells' records), beside the
    untouched models': a trained student that answers one letter everywhere shows it."""
    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    tiny_recipe["task"] = {"name": "mmlu", "prompt_format": "chat", "n_train": 8, "params": {"style": "open-instruct"}}
    tiny_recipe["training"].update(max_steps=2, max_length=512)
    tiny_recipe["evaluation"].update(limit=6, student=True, teacher=False)
    grid = {**tiny_recipe, "compare": {"methods": ["lora"], "seeds": [0]}}
    res = pktransfer.compare(recipe_from_dict(grid), quiet=True)
    cell = json.loads((res.output_dir / "compare.json").read_text())["cells"][0]
    assert sum(cell["predicted"]["test"].values()) == 6
    md = (res.output_dir / "compare.md").read_text()
    row = "| lora (1 seed) | test | " + " | ".join(str(cell["predicted"]["test"][L]) for L in "ABCD") + " |"
    assert "## Predicted answers" in md and row in md and "| student | test |" in md


def test_a_cell_resumed_before_the_cost_ledger_is_reported_as_a_lower_bound():
    """The arithmetic study's seeking[lr=0.0001] seed-1 cell resumed from step 11 of 24 before pktransfer kept a
    cost ledger: its record says so, its entry's cost figures are marked, and a ledgered resume adds the earlier
    attempts' training to the cell's time."""
    from pathlib import Path

    from pktransfer.reports import partial_cost_labels, resumed_section
    from pktransfer.study.plan import Cell
    from pktransfer.study.records import cell_record

    folder = Path(__file__).parent.parent / "docs" / "study" / "arithmetic-study" / "cells" / "seeking[lr=0.0001]" / "seed-1"
    rec = cell_record(Cell("seeking[lr=0.0001]", 1, None, folder))  # type: ignore[arg-type]
    run = json.loads((folder / "run.json").read_text())
    assert rec["resumed"] == {"step": 11, "cost_kept": False} and "step 11 of 24" in rec["cost_partial"]
    assert rec["train_seconds"] == run["stages"]["train"]["seconds"] and rec["wall_seconds"] == run["wall_seconds"]
    kept = {"label": "gkd", "seed": 0, "resumed": {"step": 8, "attempts": 1, "train_seconds": 120.0, "cost_kept": True}}
    result = {"cells": [rec, kept], "tuning": []}
    assert partial_cost_labels(result) == {"seeking[lr=0.0001]"}
    lines = resumed_section(result)
    assert "| seeking[lr=0.0001], seed 1 | 11 | not kept (†) |" in lines
    assert "| gkd, seed 0 | 8 | kept: 120 s of training over 1 attempt(s) |" in lines
    assert resumed_section({"cells": [{**rec, "resumed": None}], "tuning": []}) == []


def test_a_teacher_cache_is_shared_between_the_entries_that_read_it_and_a_lost_cost_is_flagged():
    """Its cost, kept beside the cache, is split equally between the entries whose cells read it, counted once
    whatever the number of cells; a cache without a kept cost makes its readers' totals lower bounds (‡)."""
    from pktransfer.reports import teacher_cost_table
    from pktransfer.study.analysis import teacher_caches

    cost = {"forward_tokens": 1000, "backward_tokens": 0, "seconds": 30.0, "parameters": 10, "flops": 20000.0}
    built = {"file": "kd-logits-a.safetensors", "built": True, "cost": cost}
    read = {**built, "built": False}
    lost = {"file": "semalign-targets-b.safetensors", "built": False, "cost": None}
    records = [
        {"label": "kd", "seed": 0, "teacher": {"forward_tokens": 0, "seconds": 0.0, "caches": [built]}},
        {"label": "kd", "seed": 1, "teacher": {"forward_tokens": 0, "seconds": 0.0, "caches": [read]}},
        {"label": "sem", "seed": 0, "teacher": {"forward_tokens": 50, "seconds": 2.0, "caches": [read, lost]}},
        {"label": "lora", "seed": 0, "teacher": {}},
    ]
    caches = teacher_caches(records, [])
    assert caches == {
        "kd-logits-a.safetensors": {"users": ["kd", "sem"], "cost": cost},
        "semalign-targets-b.safetensors": {"users": ["sem"], "cost": None},
    }
    out = teacher_cost_per_entry(records, [], {}, {}, {})
    assert out["kd"]["forward_tokens"] == 500 and out["kd"]["shared_seconds"] == 15.0  # half of the cache
    assert out["sem"]["forward_tokens"] == 50 + 500 and out["sem"]["seconds"] == 2.0 + 15.0
    assert out["lora"]["forward_tokens"] == 0
    result = {"teacher_cost": out, "teacher_caches": caches, "summary": {"labels": ["lora", "kd", "sem"]}, "cells": records}
    lines = teacher_cost_table(result)
    assert "| sem ‡ | 550 |" in "\n".join(lines) and "| kd | 500 |" in "\n".join(lines)
    assert "| `semalign-targets-b.safetensors` | sem | ? | ? | not kept (‡) |" in lines


def test_cached_file_keeps_the_build_cost_beside_the_cache_and_out_of_the_runs_counts(tmp_path):
    from pktransfer.methods.base import TeacherWork
    from pktransfer.methods.teacher_cache import cached_file, cost_file
    from pktransfer.progress import Progress

    work = TeacherWork(forward_tokens=7, seconds=1.0, parameters=5, what=["earlier work"])

    def compute():
        work.add("the cache's build", forward_tokens=100, seconds=4.0, parameters=9)
        return {"x": torch.ones(2)}

    path = cached_file(tmp_path, "kd-logits", "k1", compute, Progress(quiet=True), work)
    kept = json.loads(cost_file(path).read_text())
    assert kept["forward_tokens"] == 100 and kept["seconds"] == 4.0 and kept["what"] == ["the cache's build"]
    assert (work.forward_tokens, work.seconds, work.parameters, work.what) == (7, 1.0, 5, ["earlier work"])
    assert work.caches == [{"file": path.name, "built": True, "cost": kept}]
    again = TeacherWork()
    cached_file(tmp_path, "kd-logits", "k1", lambda: pytest.fail("recomputed"), Progress(quiet=True), again)
    assert again.forward_tokens == 0 and again.caches == [{"file": path.name, "built": False, "cost": kept}]
    cost_file(path).unlink()  # a cache built before its cost was kept
    old = TeacherWork()
    cached_file(tmp_path, "kd-logits", "k1", lambda: pytest.fail("recomputed"), Progress(quiet=True), old)
    assert old.caches == [{"file": path.name, "built": False, "cost": None}]


def test_the_budget_sentence_gives_each_evaluated_split_its_own_item_count():
    from pktransfer.reports import budget_in_words

    recipe = recipe_from_dict({
        "teacher": {"model": "t"}, "student": {"model": "s"}, "task": {"name": "arithmetic"},
        "evaluation": {"splits": ["test", "a_test"]},
    }).model_dump(mode="json")  # fmt: skip
    recipe["compare"] = {"seeds": [0, 1]}
    cells = [{"steps": 10, "n_eval": {"test": 300, "a_test": 200}}, {"steps": 10, "n_eval": {"test": 300, "a_test": 200}}]
    text = budget_in_words({"recipe": recipe, "cells": cells})
    assert "Evaluation: split(s) test (300 items), a_test (200 items), greedy" in text
    recipe["evaluation"]["splits"] = ["test"]  # one split: the sentence the finished studies were rendered with
    text = budget_in_words({"recipe": recipe, "cells": [{"steps": 10, "n_eval": {"test": 600}}]})
    assert "Evaluation: split(s) test, 600 items, greedy" in text


def test_the_budget_sentence_says_when_an_entry_sets_its_own_length():
    from pktransfer.reports import budget_in_words

    recipe = recipe_from_dict({
        "teacher": {"model": "t"}, "student": {"model": "s"}, "task": {"name": "arithmetic"},
        "training": {"epochs": 1}, "evaluation": {"splits": ["test"]},
        "compare": {"seeds": [0], "methods": [{"name": "lora", "sweep": {"training.epochs": [1, 2]}}]},
    }).model_dump(mode="json")  # fmt: skip
    cells = [{"steps": 75, "n_eval": {"test": 300}}, {"steps": 150, "n_eval": {"test": 300}}]
    text = budget_in_words({"recipe": recipe, "cells": cells})
    assert "for 1 epoch(s) unless the entry sets epochs (75, 150 steps run)" in text
    recipe["compare"]["methods"] = [{"name": "lora", "overrides": {"training.lr": 1e-4}}]  # not a length
    assert "for 1 epoch(s) (75, 150 steps run)" in budget_in_words({"recipe": recipe, "cells": cells})
