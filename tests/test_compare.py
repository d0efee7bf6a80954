"""`pkt compare`: planning and budget rules, statistics on fixed tables, a grid end to end, kill and resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import pktransfer
from pktransfer.errors import DataError, OutputError, PktError, RecipeError
from pktransfer.ops.statistics import describe, paired_difference
from pktransfer.recipe import recipe_from_dict
from pktransfer.study.plan import plan_grid


def _grid(base: dict, methods: list, seeds=(0, 1), **extra) -> dict:
    return {**base, "compare": {"methods": methods, "seeds": list(seeds), **extra}}


# ---- statistics on a fixed table -------------------------------------------------------------------


def test_describe_hand_computed():
    d = describe([0.5, 0.6, 0.7])
    assert d["mean"] == pytest.approx(0.6) and d["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, df=2)
    assert d["ci_low"] == pytest.approx(0.6 - half) and d["ci_high"] == pytest.approx(0.6 + half)
    one = describe([0.4])
    assert one["n"] == 1 and one["mean"] == 0.4 and math.isnan(one["std"]) and math.isnan(one["ci_low"])


def test_paired_difference_hand_computed():
    method = {0: 0.60, 1: 0.70, 2: 0.65}
    base = {0: 0.50, 1: 0.60, 2: 0.60, 3: 0.99}  # seed 3 has no partner: left out
    p = paired_difference(method, base)
    assert p["n"] == 3 and p["seeds"] == [0, 1, 2]
    assert p["mean_diff"] == pytest.approx(0.25 / 3)
    # t = 5 on 2 degrees of freedom: p = 1 - t/sqrt(2 + t^2) = 1 - 5/sqrt(27)
    assert p["p_value"] == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-6)
    same = paired_difference({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert same["mean_diff"] == 0 and math.isnan(same["p_value"])  # zero spread: t undefined, reported "n/a"
    shifted = paired_difference({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6})  # identical non-zero differences
    assert shifted["mean_diff"] == pytest.approx(0.1) and math.isnan(shifted["p_value"])


# ---- planning --------------------------------------------------------------------------------------


def test_plan_expands_sweeps_and_keeps_everything_else_equal(tiny_recipe):
    recipe = recipe_from_dict(
        _grid(
            tiny_recipe,
            ["lora", {"name": "kd", "sweep": {"method.alpha": [0.2, 0.8]}}, {"name": "pissa", "label": "pissa-fast", "niter": 2}],
        )
    )
    cells = plan_grid(recipe)
    assert [(c.label, c.seed) for c in cells[:4]] == [("lora", 0), ("kd[alpha=0.2]", 0), ("kd[alpha=0.8]", 0), ("pissa-fast", 0)]
    assert len(cells) == 8
    assert cells[2].recipe.method.alpha == 0.8 and cells[3].recipe.method.niter == 2
    assert all(c.recipe.training == recipe.training and c.recipe.lora == recipe.lora for c in cells)
    assert all(not c.recipe.evaluation.teacher and not c.recipe.evaluation.student for c in cells)
    assert cells[5].folder == Path(recipe.output_dir) / "cells" / "kd[alpha=0.2]" / "seed-1"


def test_overrides_reach_method_options_but_not_the_method_name(tiny_recipe):
    cells = plan_grid(recipe_from_dict(_grid(tiny_recipe, ["lora", {"name": "kd", "overrides": {"method.alpha": 0.3}}])))
    assert cells[1].recipe.method.alpha == 0.3
    with pytest.raises(RecipeError, match="make it an entry of its own"):
        plan_grid(recipe_from_dict(_grid(tiny_recipe, ["lora", {"name": "kd", "overrides": {"method.name": "lora"}}])))
    with pytest.raises(RecipeError, match="temperature"):  # validated like the recipe itself
        plan_grid(recipe_from_dict(_grid(tiny_recipe, ["lora", {"name": "kd", "sweep": {"method.temperature": [0]}}])))


@pytest.mark.parametrize(
    "override,match",
    [
        ({"training.lr": 1e-4}, "changes the training budget"),
        ({"training.max_steps": 8}, "changes the training budget"),
        ({"lora.r": 8}, "changes the training budget"),
        ({"training": {"lr": 1e-4}}, "changes the training budget"),
        ({"task.n_train": 4}, "the pair, task, evaluation"),
        ({"evaluation.limit": 2}, "the pair, task, evaluation"),
    ],
)
def test_unequal_budget_is_refused_unless_allowed(tiny_recipe, override, match):
    methods = ["lora", {"name": "pissa", "overrides": override}]
    with pytest.raises(RecipeError, match=match):
        plan_grid(recipe_from_dict(_grid(tiny_recipe, methods)))
    if "budget" in match:
        cells = plan_grid(recipe_from_dict(_grid(tiny_recipe, methods, allow_unequal_budget=True)))
        assert (cells[0].recipe.training, cells[0].recipe.lora) != (cells[1].recipe.training, cells[1].recipe.lora)


def test_bad_grids(tiny_recipe):
    with pytest.raises(RecipeError, match="more than once"):
        plan_grid(recipe_from_dict(_grid(tiny_recipe, ["lora", "lora"])))
    with pytest.raises(RecipeError, match="baseline 'lora' is not one of"):
        plan_grid(recipe_from_dict(_grid(tiny_recipe, ["pissa", "kd"])))
    with pytest.raises(RecipeError, match="no 'compare' section"):
        plan_grid(recipe_from_dict(tiny_recipe))
    with pytest.raises(RecipeError, match=r"compare\.methods\.0"):
        recipe_from_dict(_grid(tiny_recipe, ["lorra"]))


# ---- a grid end to end -----------------------------------------------------------------------------


def test_grid_end_to_end_with_shared_work(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.pipeline as pipeline

    tiny_recipe["output_dir"] = str(tmp_path / "grid")
    recipe = recipe_from_dict(
        _grid(
            tiny_recipe,
            ["lora", "pissa", {"name": "kd", "alpha": 0.5}, {"name": "seeking", "n_seed": 2, "structure": "row_column"}],
        )
    )
    calls = {"eval_pair": 0, "extract": 0}
    for name in calls:
        real = getattr(pipeline, {"eval_pair": "evaluate_pair", "extract": "run_verb"}[name])

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(pipeline, {"eval_pair": "evaluate_pair", "extract": "run_verb"}[name], counted)
    caches, real_run = [], pipeline.run

    def run(*a, **k):
        caches.append(k.get("cache_dir"))
        return real_run(*a, **k)

    monkeypatch.setattr(pipeline, "run", run)
    res = pktransfer.compare(recipe, quiet=True)
    out = res.output_dir
    assert calls == {"eval_pair": 1, "extract": 1}  # base evaluations and sensitivity once for the grid
    assert caches == [out / "shared"] * 8  # every cell may share content-keyed caches (LaTen's location)
    assert len(list((out / "shared" / "kd-logits").glob("*.safetensors"))) == 1
    for name in ("compare.md", "compare.csv", "compare.json", "compare_scores.png", "compare_loss.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    s = res.result["summary"]
    assert s["labels"] == ["lora", "pissa", "kd", "seeking"] and s["equal_budget"]
    assert s["by_label"]["kd"]["metrics"]["test"]["n"] == 2
    assert "test" in s["by_label"]["kd"]["paired_vs_baseline"] and not s["by_label"]["lora"]["paired_vs_baseline"]
    rows = (out / "compare.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("label,method,metric,n_seeds,mean,std,ci95_low")
    md = (out / "compare.md").read_text()
    assert "Every cell trains the student" in md and "paired t-test" in md and "| kd | 2 |" in md
    # the budget is counted, not assumed: same parameters, steps and tokens per seed; the teacher's work is named
    assert "Budget as counted" in md and "**Equal budget**" in md
    spent = {c["label"]: c["spent"] for c in res.result["cells"] if c["seed"] == 0}
    assert len({json.dumps(v, sort_keys=True) for v in spent.values()}) == 1 and spent["lora"]["training_tokens"] > 0
    kd_cells = [c for c in res.result["cells"] if c["label"] == "kd"]
    first, second = (c["teacher"] for c in kd_cells)  # the first KD cell computed the cached logits, the second reused them
    (cache,) = (out / "shared" / "kd-logits").glob("*.safetensors")
    kept = json.loads(cache.with_name(cache.name.replace(".safetensors", ".cost.json")).read_text())
    assert kept["forward_tokens"] > 0 and kept["flops"] == 2 * kept["parameters"] * kept["forward_tokens"]
    assert first["forward_tokens"] == second["forward_tokens"] == 0  # the cache is counted apart, once
    assert first["caches"] == [{"file": cache.name, "built": True, "cost": kept}]
    assert second["caches"] == [{"file": cache.name, "built": False, "cost": kept}]
    assert res.result["teacher_caches"] == {cache.name: {"users": ["kd"], "cost": kept}}
    assert res.result["teacher_cost"]["kd"]["forward_tokens"] == kept["forward_tokens"]
    assert f"`{cache.name}` | kd |" in md
    # every seeking cell used the shared sensitivity without copying it
    for seed in (0, 1):
        cell = out / "cells" / "seeking" / f"seed-{seed}"
        assert not (cell / "sensitivity" / "sensitivity.safetensors").exists()
        assert "shared" in json.loads((cell / "sensitivity" / "summary.json").read_text())["source"]
    # a second invocation reruns nothing
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("a finished cell was rerun"))
    again = pktransfer.compare(recipe, quiet=True)
    assert again.result["summary"] == res.result["summary"]


def test_finished_cells_with_another_recipe_are_refused(tiny_recipe, tmp_path):
    tiny_recipe["output_dir"] = str(tmp_path / "grid")
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    pktransfer.compare(recipe_from_dict(_grid(tiny_recipe, ["lora"], seeds=[0])), quiet=True)
    tiny_recipe["training"]["lr"] = 5e-4
    with pytest.raises(OutputError, match=r"different recipe \(training\.lr"):
        pktransfer.compare(recipe_from_dict(_grid(tiny_recipe, ["lora"], seeds=[0])), quiet=True)


def _cells_done(root: Path) -> int:
    """Finished cells: run.json in a folder renamed into place (a killed cell's '.partial' may hold one too)."""
    return len([p for p in root.glob("cells/*/seed-*/run.json") if not p.parent.name.endswith(".partial")])


def test_killed_grid_resumes_only_missing_cells_and_matches_an_uninterrupted_run(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.pipeline as pipeline

    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["training"]["max_steps"] = 6
    grid = _grid(tiny_recipe, ["lora", "pissa", {"name": "kd", "alpha": 0.5}], seeds=[0, 1])
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for folder in (killed, clean):
        grid["output_dir"] = str(folder)
        (tmp_path / f"{folder.name}.yaml").write_text(yaml.safe_dump(grid))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pktransfer.cli", "compare", str(tmp_path / "killed.yaml"), "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while _cells_done(killed) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _cells_done(killed)
    assert 2 <= done_before < 6

    runs = []
    real_run = pipeline.run
    monkeypatch.setattr(pipeline, "run", lambda r, **k: runs.append(r.output_dir) or real_run(r, **k))
    resumed = pktransfer.compare(pktransfer.load_recipe(tmp_path / "killed.yaml"), quiet=True)
    assert len(runs) == 6 - done_before  # only the missing cells ran
    full = pktransfer.compare(pktransfer.load_recipe(tmp_path / "clean.yaml"), quiet=True)
    strip = (
        "folder",
        "prepare_seconds",
        "train_seconds",
        "wall_seconds",
        "peak_rss_anon_gib",
        "peak_cuda_gib",
        "teacher",
    )  # timings, and which cell happened to fill the shared KD cache
    a = [{k: v for k, v in c.items() if k not in strip} for c in resumed.result["cells"]]
    b = [{k: v for k, v in c.items() if k not in strip} for c in full.result["cells"]]
    assert a == b
    sa, sb = resumed.result["summary"]["by_label"], full.result["summary"]["by_label"]
    assert {k: v["metrics"] for k, v in sa.items()} == {k: v["metrics"] for k, v in sb.items()}


def test_zero_variance_p_value_prints_na_and_a_short_grid_still_plots_its_loss(tmp_path):
    from pktransfer.reports import plot_compare

    result = {
        "summary": {
            "labels": ["lora"],
            "metrics": ["test"],
            "baseline": "lora",
            "by_label": {
                "lora": {"metrics": {"test": {"n": 1, "mean": 0.5, "ci_low": 0.5, "ci_high": 0.5, "per_seed": {0: 0.5}}}}
            },
        },
        "base": {},
        "cells": [{"label": "lora", "loss_curve": [(2, 1.25)]}],
    }
    import matplotlib

    matplotlib.use("Agg")
    paths = plot_compare(result, tmp_path)
    assert any(p.name == "compare_loss.png" for p in paths)


def test_a_grid_whose_methods_train_different_parameters_is_not_called_equal(tiny_recipe, tmp_path):
    tiny_recipe["output_dir"] = str(tmp_path / "grid")
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    recipe = recipe_from_dict(_grid(tiny_recipe, ["lora", {"name": "semalign", "n_seed": 2, "critical_layers": 1}], seeds=[0]))
    res = pktransfer.compare(recipe, quiet=True)
    s = res.result["summary"]
    assert not s["equal_budget"] and any(d.startswith("trainable parameters") for d in s["budget_differences"])
    md = (res.output_dir / "compare.md").read_text()
    assert "The budgets are not equal" in md and "trainable parameters (seed 0): lora" in md
    sem = s["by_label"]["semalign"]
    assert sem["spent"]["trainable_parameters"] < s["by_label"]["lora"]["spent"]["trainable_parameters"]
    assert sem["teacher"]["backward_tokens"] > 0  # the attribution's backward passes through the teacher


# ---- issue 17: bootstrap, MDE, tuning on validation ----------------------------------------------------


def test_paired_bootstrap_against_a_hand_computed_case():
    from pktransfer.ops.statistics import minimum_detectable_effect, paired_bootstrap

    # one seed, two items: differences [1, 0]. Resampling 2 items with replacement gives a mean of 0, 0.5 or 1
    # with probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1], P(Δ <= 0) = 1/4, SE = sqrt(1/8).
    b = paired_bootstrap({0: {"a": 1.0, "b": 1.0}}, {0: {"a": 0.0, "b": 1.0}}, resamples=20000, seed=3)
    assert b["mean_diff"] == 0.5 and (b["ci_low"], b["ci_high"]) == (0.0, 1.0)
    assert b["p_le_zero"] == pytest.approx(0.25, abs=0.015) and b["se"] == pytest.approx(math.sqrt(1 / 8), abs=0.01)
    assert b["n_items"] == 2 and b["n_seeds"] == 1
    # identical per-item differences: no spread at all, whatever is resampled
    same = paired_bootstrap({0: {"a": 1.0, "b": 1.0}, 1: {"a": 1.0, "b": 1.0}}, {0: {"a": 0, "b": 0}, 1: {"a": 0, "b": 0}})
    assert (same["ci_low"], same["ci_high"], same["se"]) == (1.0, 1.0, 0.0)
    # only items and seeds both have are paired
    part = paired_bootstrap({0: {"a": 1.0, "x": 1.0}, 5: {"a": 0.0}}, {0: {"a": 0.0}}, resamples=200)
    assert part["n_items"] == 1 and part["n_seeds"] == 1 and part["mean_diff"] == 1.0
    assert minimum_detectable_effect(0.01) == pytest.approx((1.959964 + 0.841621) * 0.01, rel=1e-5)


def test_design_mde_by_hand():
    from pktransfer.ops.statistics import design_mde

    # p 0.5, 100 items x 2 seeds: SE = sqrt(2 · 0.25 / 200) = 0.05, MDE = 2.8016 · 0.05
    assert design_mde(0.5, 100, 2) == pytest.approx(2.801585 * 0.05, rel=1e-5)


def test_train_and_validation_are_disjoint_and_training_items_unchanged(tiny_recipe):
    from pktransfer.data import get_task, train_and_validation

    task = get_task("arithmetic", {"sizes": {"train": 40, "test": 6}})
    plain, none = train_and_validation(task, 16, None)
    train, val = train_and_validation(task, 16, 8)
    assert none == [] and [i.id for i in train] == [i.id for i in plain]  # the first 16 stay the first 16
    assert len(val) == 8 and not {i.id for i in train} & {i.id for i in val}
    assert [i.id for i in val] == [i.id for i in task.split("train")[-8:]]
    with pytest.raises(DataError, match="whole train split"):
        train_and_validation(task, None, 40)


def _tuned_grid(tiny_recipe, folder):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["task"]["validation"] = 6
    tiny_recipe["task"]["params"]["sizes"]["train"] = 24
    grid = _grid(
        tiny_recipe,
        ["lora", {"name": "pissa", "tune": {"key": "training.lr", "values": [1e-4, 3e-3]}}, {"name": "kd", "tune": False}],
        seeds=[0, 1],
        tune={"values": [3e-3, 1e-4]},
    )
    grid["output_dir"] = str(folder)
    return recipe_from_dict(grid)


def test_tuning_reads_validation_only_chooses_the_best_value_and_resumes_to_the_same_table(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.pipeline as pipeline

    # what models are evaluated on, in order (the test split's data is checked before any work starts, but
    # no model may see a test item until every tuned value is chosen)
    reads: list[str] = []
    real_eval = pipeline.evaluate_items
    monkeypatch.setattr(pipeline, "evaluate_items", lambda *a, **k: reads.append(k["split"]) or real_eval(*a, **k))

    phases: list[str] = []
    real_run = pipeline.run

    def run(r, **k):
        phases.append("tune" if "/tune/" in r.output_dir else "cell")
        reads.append("<run:" + phases[-1] + ">")
        return real_run(r, **k)

    monkeypatch.setattr(pipeline, "run", run)
    res = pktransfer.compare(_tuned_grid(tiny_recipe, tmp_path / "a"), quiet=True)
    # every tuning cell ran before any grid cell, evaluated on validation only, and no model saw test until then
    first_cell = reads.index("<run:cell>")
    assert set(reads[:first_cell]) == {"<run:tune>", "validation"} and phases.count("tune") == 4
    assert "test" in reads[first_cell:]
    tuning = res.result["tuning"]
    assert {(t["label"], t["value"]) for t in tuning} == {("lora", 3e-3), ("lora", 1e-4), ("pissa", 1e-4), ("pissa", 3e-3)}
    for label in ("lora", "pissa"):
        rows = [t for t in tuning if t["label"] == label]
        best = max(rows, key=lambda t: (t["validation"], -t["index"]))
        assert res.result["chosen"][label] == {"training.lr": best["value"]}
        cell = json.loads((tmp_path / "a" / "cells" / label / "seed-1" / "run.json").read_text())
        assert cell["recipe"]["training"]["lr"] == best["value"]  # every seed runs the chosen value
    assert "kd" not in res.result["chosen"]
    tune_run = json.loads((tmp_path / "a" / "tune" / "lora" / "value-0" / "run.json").read_text())
    assert list(tune_run["metrics"]["trained"]) == ["validation"]
    md = (tmp_path / "a" / "compare.md").read_text()
    assert "## Tuning on validation" in md and "Not tuned (run at the recipe's values): kd" in md
    assert "bootstrap" in md and "MDE" in md and "teacher-free" in md and "teacher outputs" in md
    assert "Total compute of this comparison" in md

    # interrupted after two tuning cells: the resumed comparison gives the same tables
    monkeypatch.setattr(pipeline, "run", real_run)
    calls = {"n": 0}

    def dies(r, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run(r, **k)

    monkeypatch.setattr(pipeline, "run", dies)
    with pytest.raises(KeyboardInterrupt):
        pktransfer.compare(_tuned_grid(tiny_recipe, tmp_path / "b"), quiet=True)
    monkeypatch.setattr(pipeline, "run", real_run)
    again = pktransfer.compare(_tuned_grid(tiny_recipe, tmp_path / "b"), quiet=True)
    strip = ("wall_seconds",)
    assert [{k: v for k, v in t.items() if k not in strip} for t in again.result["tuning"]] == [
        {k: v for k, v in t.items() if k not in strip} for t in tuning
    ]
    assert again.result["chosen"] == res.result["chosen"]
    sa, sb = again.result["summary"]["by_label"], res.result["summary"]["by_label"]
    assert {k: v["metrics"] for k, v in sa.items()} == {k: v["metrics"] for k, v in sb.items()}


def test_tuning_needs_validation_and_may_not_tune_what_every_cell_shares(tiny_recipe):
    with pytest.raises(RecipeError, match=r"task\.validation"):
        pktransfer.compare(recipe_from_dict(_grid(tiny_recipe, ["lora"], tune={"values": [1e-4]})), quiet=True)
    with pytest.raises(RecipeError, match="shares"):
        recipe_from_dict(_grid(tiny_recipe, ["lora"], tune={"key": "task.n_train", "values": [8]}))
    tiny_recipe["task"]["validation"] = 4
    with pytest.raises(RecipeError, match="both sets and tunes"):
        pktransfer.compare(
            recipe_from_dict(_grid(tiny_recipe, [{"name": "lora", "overrides": {"training.lr": 1e-4}}], tune={"values": [1e-4]})),
            quiet=True,
        )


def test_records_carry_a_grid_to_another_machine(tiny_recipe, tmp_path, monkeypatch):
    """Interrupted with --records, the grid folder lost (another machine): rerunning with the same records runs
    only what the records lack, and the report equals the uninterrupted one; a record of another recipe is refused."""
    import shutil

    import pktransfer.pipeline as pipeline

    records = tmp_path / "records"
    full = pktransfer.compare(_tuned_grid(tiny_recipe, tmp_path / "full"), quiet=True)
    real_run = pipeline.run
    ran: list[str] = []

    def dies_on_fifth(r, **k):
        ran.append(r.output_dir)
        if len(ran) == 5:
            raise KeyboardInterrupt
        return real_run(r, **k)

    monkeypatch.setattr(pipeline, "run", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        pktransfer.compare(_tuned_grid(tiny_recipe, tmp_path / "first"), quiet=True, records=records)
    finished = sorted(str(p.parent.relative_to(records)) for p in records.glob("**/run.json"))
    assert len(finished) == 4 and all(f.startswith("tune/") for f in finished)  # the four tuning cells
    assert not list(records.glob("**/adapter*")) and not list(records.glob("**/*.safetensors"))  # no weights

    shutil.rmtree(tmp_path / "first")  # the machine is gone; only the records travel
    ran.clear()
    monkeypatch.setattr(pipeline, "run", lambda r, **k: ran.append(r.output_dir) or real_run(r, **k))
    again = pktransfer.compare(_tuned_grid(tiny_recipe, tmp_path / "second"), quiet=True, records=records)
    assert not any("/tune/" in r for r in ran) and len(ran) == 6  # only the grid's 3 entries x 2 seeds
    strip = ("wall_seconds",)
    assert [{k: v for k, v in t.items() if k not in strip} for t in again.result["tuning"]] == [
        {k: v for k, v in t.items() if k not in strip} for t in full.result["tuning"]
    ]
    sa, sb = again.result["summary"]["by_label"], full.result["summary"]["by_label"]
    assert {k: v["metrics"] for k, v in sa.items()} == {k: v["metrics"] for k, v in sb.items()}
    assert (records / "compare.md").is_file() and (records / "cells" / "kd" / "seed-1" / "run.json").is_file()

    other = _tuned_grid(tiny_recipe, tmp_path / "third")
    other.training.warmup_ratio = 0.5  # another recipe: its cells may not be taken from these records
    with pytest.raises(Exception, match="recipe"):
        pktransfer.compare(other, quiet=True, records=records)


def test_records_made_in_another_folder_restore_without_rerunning_anything(tiny_recipe, tmp_path, monkeypatch):
    """A finished grid whose cells point at shared caches (KD's logits, Seeking's sensitivity) by absolute path,
    restored from its records into another folder (another checkout, another machine): the cells' paths are
    moved into the new grid, nothing is trained or extracted again, and the report is the same."""
    import shutil

    import yaml

    import pktransfer.pipeline as pipeline

    tiny_recipe["evaluation"].update(teacher=False, student=False)
    grid = _grid(tiny_recipe, ["lora", "kd", {"name": "seeking", "n_seed": 2}], seeds=[0])
    records = tmp_path / "records"
    first = pktransfer.compare(recipe_from_dict({**grid, "output_dir": str(tmp_path / "a")}), quiet=True, records=records)
    assert str(tmp_path / "a" / "shared") in (records / "cells" / "kd" / "seed-0" / "recipe.yaml").read_text()
    assert (records / "shared").is_dir()  # shared work is recorded (its cost), never restored
    shutil.rmtree(tmp_path / "a")
    before = {f: f.read_bytes() for f in records.rglob("*") if f.is_file() and f.parent.name != "shared"}

    def refuse(*a, **k):
        raise AssertionError("nothing may run again")

    monkeypatch.setattr(pipeline, "run", refuse)
    monkeypatch.setattr(pipeline, "run_verb", refuse)
    again = pktransfer.compare(recipe_from_dict({**grid, "output_dir": str(tmp_path / "b")}), quiet=True, records=records)
    sa, sb = again.result["summary"]["by_label"], first.result["summary"]["by_label"]
    assert {k: v["metrics"] for k, v in sa.items()} == {k: v["metrics"] for k, v in sb.items()}
    assert list(again.result["shared_work_seconds"].values()) == list(first.result["shared_work_seconds"].values())
    # nothing ran: the report keeps the wall time of the invocation that did the work (a re-render changes no figure)
    assert again.result["wall_seconds_this_invocation"] == first.result["wall_seconds_this_invocation"] > 0
    moved = yaml.safe_load((tmp_path / "b" / "cells" / "kd" / "seed-0" / "recipe.yaml").read_text())
    assert moved["method"]["logits_cache"].startswith(str(tmp_path / "b" / "shared"))
    assert not (tmp_path / "b" / "shared").exists()  # the caches were not rebuilt
    # restoring is not rerunning: the records keep their own grid's paths and report no rerun (once, every record
    # was rewritten with the new folder's paths and a rerun entry)
    assert not again.result["reruns"] and not list(records.rglob("reruns.json"))
    cells = [f for f in before if "cells" in f.parts or "tune" in f.parts]
    assert cells and all(f.read_bytes() == before[f] for f in cells)


def test_a_tuned_seeking_entry_reuses_its_shared_sensitivity_at_the_chosen_value(tiny_recipe, tmp_path, monkeypatch):
    """The shared sensitivity is made once for the tuning cells (at the first learning rate, on validation) and
    serves the grid's cells at the chosen rate on test: its folder's name is the hash of what it depends on.
    (The study once stopped here: the grid compared the whole recipe and refused the folder.)"""
    import pktransfer.pipeline as pipeline

    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["task"]["validation"] = 6
    tiny_recipe["task"]["params"]["sizes"]["train"] = 24
    grid = _grid(tiny_recipe, [{"name": "seeking", "n_seed": 3}], seeds=[0], tune={"values": [3e-3, 1e-4]}, baseline="seeking")
    grid["output_dir"] = str(tmp_path / "g")
    verbs: list[str] = []
    real = pipeline.run_verb
    monkeypatch.setattr(pipeline, "run_verb", lambda r, verb, **k: verbs.append(verb) or real(r, verb, **k))
    res = pktransfer.compare(recipe_from_dict(grid), quiet=True)
    assert verbs == ["extract"]  # one sensitivity for the tuning cells and the grid
    chosen = res.result["chosen"]["seeking"]["training.lr"]
    cell = json.loads((tmp_path / "g" / "cells" / "seeking" / "seed-0" / "run.json").read_text())
    assert cell["recipe"]["training"]["lr"] == chosen and "test" in cell["metrics"]["trained"]


def _finished_grid(folder: Path) -> Path:
    """A finished grid's compare.json and untouched-student records, written by hand: entries x and y on
    seeds 0 and 1 over four items."""
    scores = {
        ("x", 0): [1, 1, 1, 0],
        ("x", 1): [1, 0, 1, 0],
        ("y", 0): [1, 0, 0, 0],
        ("y", 1): [0, 0, 1, 0],
    }
    cells = [
        {"label": lab, "seed": seed, "items": {"test": {f"i{k}": float(v) for k, v in enumerate(vals)}}}
        for (lab, seed), vals in scores.items()
    ]
    (folder / "base" / "eval").mkdir(parents=True)
    (folder / "compare.json").write_text(json.dumps({"recipe": {"task": {"name": "arithmetic"}}, "cells": cells}))
    rows = [{"id": f"i{k}", "correct": bool(v)} for k, v in enumerate([0, 1, 0, 0])]
    (folder / "base" / "eval" / "student.arithmetic.test.items.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_contrast_pairs_two_entries_and_the_untouched_student(tmp_path):
    from typer.testing import CliRunner

    from pktransfer.cli import app
    from pktransfer.study.analysis import contrast

    grid = _finished_grid(tmp_path / "grid")
    r = contrast(grid, "x", "y")
    assert r["by_seed"] == {0: 0.5, 1: 0.25}  # x: 3/4 and 2/4; y: 1/4 and 1/4
    assert r["bootstrap"]["mean_diff"] == pytest.approx(0.375) and r["bootstrap"]["n_items"] == 4
    assert r["bootstrap"]["ci_low"] <= 0.375 <= r["bootstrap"]["ci_high"] and r["bootstrap"]["mde"] > 0
    s = contrast(grid, "x", "student")  # the untouched student (1/4) stands on every seed of x
    assert s["by_seed"] == {0: 0.5, 1: 0.25} and s["bootstrap"]["n_seeds"] == 2
    assert contrast(grid, "student", "y")["by_seed"] == {0: 0.0, 1: 0.0}
    with pytest.raises(DataError, match="no entry 'z'") as err:
        contrast(grid, "x", "z")
    assert "x, y" in err.value.hint
    with pytest.raises(DataError, match="untouched teacher"):
        contrast(grid, "x", "teacher")
    with pytest.raises(DataError, match=r"no compare\.json"):
        contrast(tmp_path, "x", "y")
    out = CliRunner().invoke(app, ["contrast", str(grid), "x", "y"])
    assert out.exit_code == 0 and "+37.5 points" in " ".join(out.output.split()), out.output


# ---- the budget rule -------------------------------------------------------------------------------


def test_estimate_and_cut_hand_computed():
    from pktransfer.study.budget import cut_to_budget, estimate_grid

    per_entry, base, matched = estimate_grid(
        {"lora": (2, 3), "gkd": (2, 3), "pissa": (0, 3)},
        train_seconds=100.0,
        item_seconds=0.5,
        n_validation=40,
        n_test=600,
        factors={"gkd": 3.0},
        teacher_eval_factor=3.0,
    )
    # lora: 2 x (100 + 20) + 3 x (100 + 300) = 1440; gkd: 2 x (300 + 20) + 3 x (300 + 300) = 2440; pissa: 3 x 400
    assert per_entry == {"lora": 1440.0, "gkd": 2440.0, "pissa": 1200.0} and matched == {}
    assert base == 600 * 0.5 * 4  # 1200: student + teacher at 3x
    total = 1440 + 2440 + 1200 + 1200  # 6280 s
    assert cut_to_budget(per_entry, base, total / 3600, ["gkd", "pissa"]) == []
    assert cut_to_budget(per_entry, base, (total - 1) / 3600, ["pissa", "gkd"]) == ["pissa"]
    assert cut_to_budget(per_entry, base, 3000 / 3600, ["pissa", "gkd"]) == ["pissa", "gkd"]  # 2640 s left
    assert cut_to_budget(per_entry, base, 0.1, ["pissa"]) == ["pissa"]  # applied as written, even if still over


def test_dropping_one_of_a_matched_pair_drops_its_partners_matched_cells():
    from pktransfer.study.budget import cut_to_budget, estimate_grid

    per_entry, base, matched = estimate_grid(
        {"a": (0, 2), "b": (0, 2), "c": (0, 2)},
        train_seconds=100.0,
        item_seconds=1.0,
        n_validation=0,
        n_test=100,
        factors={},
        teacher_eval_factor=1.0,
        matched={("a", "b"): 2, ("b", "a"): 2},
    )
    # a cell costs 200 s; a and b: 2 own + 2 matched cells = 800 s; c: 400 s; base 200 s; total 2200 s
    assert per_entry == {"a": 800.0, "b": 800.0, "c": 400.0} and matched == {("a", "b"): 400.0, ("b", "a"): 400.0}
    # dropping b removes b's 800 s and a's 400 s at b's settings: 1000 s left, so c is kept under a 1000 s budget
    assert cut_to_budget(per_entry, base, 1000 / 3600, ["b", "c"], matched) == ["b"]
    assert cut_to_budget(per_entry, base, 1000 / 3600, ["b", "c"]) == ["b", "c"]  # without the pairing: both


def test_budget_rule_runs_a_pilot_and_drops_by_the_declared_order(tiny_recipe, tmp_path):
    tiny_recipe["output_dir"] = str(tmp_path / "grid")
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["training"]["max_steps"] = 2
    budget = {"hours": 1e-6, "cut_order": ["kd", "pissa"], "cost_factors": {"kd": 2.0}}
    grid = _grid(tiny_recipe, ["lora", "pissa", {"name": "kd", "alpha": 0.5}], seeds=[0], budget=budget)
    records = tmp_path / "records"
    res = pktransfer.compare(recipe_from_dict(grid), quiet=True, records=records)
    decision = json.loads((tmp_path / "grid" / "budget.json").read_text())
    assert decision["dropped"] == ["kd", "pissa"] and decision["pilot"]["cell"] == "cells/lora/seed-0"
    assert decision["estimate_seconds"]["kd"] > decision["estimate_seconds"]["pissa"] > 0
    assert [c["label"] for c in res.result["cells"]] == ["lora"]
    assert not (tmp_path / "grid" / "cells" / "kd").exists()
    assert "## Cost rule" in (tmp_path / "grid" / "compare.md").read_text()
    assert (records / "budget.json").is_file()
    # the decision is never re-made: a later sitting with a generous budget keeps it
    grid["compare"]["budget"]["hours"] = 1000.0
    again = pktransfer.compare(recipe_from_dict(grid), quiet=True)
    assert [c["label"] for c in again.result["cells"]] == ["lora"]
    with pytest.raises(RecipeError, match="the baseline"):
        grid["compare"]["budget"]["cut_order"] = ["lora"]
        tiny_recipe["output_dir"] = str(tmp_path / "other")
        pktransfer.compare(recipe_from_dict({**grid, "output_dir": str(tmp_path / "other")}), quiet=True)


def test_remaining_time_of_a_grid_by_hand():
    from pktransfer.study.budget import remaining_seconds_of_cells

    finished = {"lora": [100.0, 140.0]}
    tuned = {"lora": [50.0], "gkd": [300.0]}
    # lora at its finished cells' mean (120), gkd at its tuning cells' (300), laten at the mean of all four (147.5)
    assert remaining_seconds_of_cells(["lora", "gkd", "laten"], finished, tuned) == 120 + 300 + 147.5
    assert remaining_seconds_of_cells(["lora"], {}, {}) is None


def test_a_grid_logs_the_time_its_unfinished_cells_will_take(tiny_recipe, tmp_path):
    import io

    from rich.console import Console

    from pktransfer.progress import Progress

    tiny_recipe["evaluation"].update(teacher=False, student=False)
    out = io.StringIO()
    grid = recipe_from_dict(_grid(tiny_recipe, ["lora"], seeds=[0, 1]))
    pktransfer.compare(grid, progress=Progress(console=Console(file=out, width=300)))
    lines = [line for line in out.getvalue().splitlines() if "of cells left" in line]
    assert len(lines) == 1 and "(1 unfinished, this one included;" in lines[0]  # nothing measured before cell 1


def test_the_untouched_models_are_recorded_as_soon_as_they_are_evaluated(tiny_recipe, tmp_path, monkeypatch):
    """A grid stopped after its base/ evaluation (here: its first cell fails) has base/ in its records, so resuming
    it elsewhere from the records does not evaluate the untouched models again."""
    import pktransfer.pipeline as pipeline

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom

    monkeypatch.setattr(pipeline, "run", fail)
    records = tmp_path / "records"
    with pytest.raises(PktError, match=r"1 job\(s\) of the grid failed: cell 1/1: lora, seed 0: Boom\n"):
        pktransfer.compare(recipe_from_dict(_grid(tiny_recipe, ["lora"], seeds=[0])), quiet=True, records=records)
    assert (records / "base" / "run.json").is_file()


def test_a_failing_cell_does_not_stop_the_others_and_a_rerun_finishes_the_grid(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.pipeline as pipeline

    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["output_dir"] = str(tmp_path / "grid")
    recipe = recipe_from_dict(_grid(tiny_recipe, ["lora", "pissa"], seeds=[0, 1]))
    real_run, ran = pipeline.run, []

    def broken_pissa_seed_0(r, **k):
        ran.append(r.output_dir)
        if r.output_dir.endswith("pissa/seed-0"):
            raise RuntimeError("a bug in one cell")
        return real_run(r, **k)

    monkeypatch.setattr(pipeline, "run", broken_pissa_seed_0)
    with pytest.raises(PktError, match=r"1 job\(s\) of the grid failed: cell 2/4: pissa, seed 0: RuntimeError: a bug"):
        pktransfer.compare(recipe, quiet=True)
    assert len(ran) == 4 and _cells_done(tmp_path / "grid") == 3  # the cells after it ran
    assert not (tmp_path / "grid" / "compare.md").exists()
    ran.clear()
    monkeypatch.setattr(pipeline, "run", lambda r, **k: ran.append(r.output_dir) or real_run(r, **k))
    res = pktransfer.compare(recipe, quiet=True)
    assert [Path(p).name for p in ran] == ["seed-0"] and res.result["summary"]["by_label"]["pissa"]["seeds"] == [0, 1]


def test_an_interim_report_covers_the_finished_cells_and_names_the_rest(tiny_recipe, tmp_path, monkeypatch):
    """`pkt compare --interim` runs nothing and writes compare.interim.md/.json (never compare.md), from the grid and,
    where a folder is missing there, from the records; its statistics pair only the seeds both entries have."""
    import pktransfer.pipeline as pipeline
    from pktransfer.study.interim import interim_report

    tiny_recipe["evaluation"].update(teacher=False, student=True)
    tiny_recipe["output_dir"] = str(tmp_path / "grid")
    recipe = recipe_from_dict(_grid(tiny_recipe, ["lora", "pissa"], seeds=[0, 1]))
    records = tmp_path / "records"
    with pytest.raises(OutputError, match="no test cell"):
        interim_report(recipe)
    real_run, ran = pipeline.run, []

    def dies_on_fourth(r, **k):
        ran.append(r.output_dir)
        if len(ran) == 4:
            raise KeyboardInterrupt
        return real_run(r, **k)

    monkeypatch.setattr(pipeline, "run", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        pktransfer.compare(recipe, quiet=True, records=records)
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("an interim report ran a cell"))
    shutil.rmtree(tmp_path / "grid" / "cells" / "lora" / "seed-0")  # a fresh clone: that cell is in the records only
    res = interim_report(recipe, records=records)
    info = res.result["interim"]
    assert (info["finished"], info["cells"]) == (3, 4) and info["unfinished"] == [{"label": "pissa", "seed": 1}]
    s = res.result["summary"]
    assert s["by_label"]["lora"]["seeds"] == [0, 1] and s["by_label"]["pissa"]["seeds"] == [0]
    assert s["by_label"]["pissa"]["paired_vs_baseline"]["test"]["seeds"] == [0]  # paired on the shared seed only
    assert s["by_label"]["pissa"]["paired_vs_baseline"]["test"]["bootstrap"]["n_seeds"] == 1
    for folder in (tmp_path / "grid", records):
        md = (folder / "compare.interim.md").read_text()
        assert "Interim report" in md and "3 of 4 cells finished" in md and "pissa (seed 1)" in md
        assert "Plots:" not in md and "Machine-readable: `compare.interim.json`." in md  # no plots, no csv yet
        assert json.loads((folder / "compare.interim.json").read_text())["interim"] == info
        assert not (folder / "compare.md").exists()
    assert "student" in res.result["base"]  # the untouched student, evaluated before the cells


def test_refill_takes_back_the_dropped_entries_that_fit_the_last_dropped_first():
    from pktransfer.study.budget import cut_to_budget, refill

    per_entry = {"lora": 1000.0, "kd": 1000.0, "v2": 2000.0, "laten": 4000.0}  # 8,000 s in all; lora is never cut
    order = ["kd", "v2", "laten"]
    # 4,500 s: the cut drops kd (7,000 left), v2 (5,000), laten (1,000); taking back, the last dropped first: laten
    # (5,000: no), v2 (3,000: yes), kd (4,000: yes)
    dropped = cut_to_budget(per_entry, 0.0, 4500 / 3600, order)
    assert dropped == ["kd", "v2", "laten"]
    assert refill(dropped, per_entry, 0.0, 4500 / 3600) == ["laten"]
    # 2,500 s: laten (5,000) no, v2 (3,000) no, kd (2,000) yes
    assert refill(cut_to_budget(per_entry, 0.0, 2500 / 3600, order), per_entry, 0.0, 2500 / 3600) == ["v2", "laten"]
    # nothing dropped, nothing to take back; a cut that stopped in time takes nothing back either
    assert refill([], per_entry, 0.0, 1.0) == []
    assert refill(cut_to_budget(per_entry, 0.0, 5000 / 3600, order), per_entry, 0.0, 5000 / 3600) == ["kd", "v2"]


def test_the_budget_decision_with_refill_keeps_a_cheap_entry_the_cut_passed(tiny_recipe):
    from pktransfer.study.budget import decide

    pilot = {"cell": "cells/lora/seed-0", "train_seconds": 100.0, "eval_seconds": 6.0, "n_eval": 6}
    budget = {"hours": 1e-6, "cut_order": ["pissa", "kd"], "cost_factors": {"kd": 10.0}}
    grid = _grid(tiny_recipe, ["lora", "pissa", "kd"], seeds=[0, 1], budget=budget)
    est = decide(recipe_from_dict(grid), pilot)
    s = est["estimate_seconds"]
    room = est["base_hours"] * 3600 + s["lora"] + s["pissa"]  # lora and pissa fit, kd does not
    grid["compare"]["budget"]["hours"] = room / 3600 + 1e-6
    assert decide(recipe_from_dict(grid), pilot)["dropped"] == ["pissa", "kd"]  # the cut passed pissa to reach kd
    grid["compare"]["budget"]["refill"] = True
    refilled = decide(recipe_from_dict(grid), pilot)
    assert refilled["dropped"] == ["kd"] and refilled["rule"]["refill"] is True
