"""The planted-facts benchmark: the fact table, its splits by person, its scoring, the leak guard and `pkt plant`."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
from test_fast_path import STUDY_METHODS

from pktransfer.data import get_task
from pktransfer.data.planted import ATTRIBUTES, GROUPS, make_fact_table
from pktransfer.data.scoring import exact_match_word
from pktransfer.errors import DataError, RecipeError

# every method of the MMLU study, and the teacher-delta start alone and composed (it trains its own teacher delta on the
# task's train split here, which must hold A's facts only too)
METHODS = [
    *STUDY_METHODS,
    {"name": "delta", "teacher_training": {"epochs": 1, "r": 2}},
    {"name": "compose", "start": {"name": "delta", "teacher_training": {"epochs": 1, "r": 2}}, "objective": {"name": "gkd"}},
]
SMALL = {
    "people": {"A": 4, "B_val": 2, "B_test": 3},
    "attributes": ["city", "pet"],
    "sizes": {"seed": 4, "extract": 2, "align": 4},
}


def _names_in(text: str, names: list[str]) -> list[str]:
    return [n for n in names if n in text]


def test_the_fact_table_is_deterministic_balanced_and_split_by_person():
    a = make_fact_table(3, {"A": 20, "B_val": 10, "B_test": 30}, ["city", "pet", "food"], 10)
    b = make_fact_table(3, {"A": 20, "B_val": 10, "B_test": 30}, ["city", "pet", "food"], 10)
    assert a == b and a != make_fact_table(4, {"A": 20, "B_val": 10, "B_test": 30}, ["city", "pet", "food"], 10)
    people = [p for g in GROUPS for p in a.people[g]]
    assert len(set(people)) == 60 and all(len(p.split()) == 2 for p in people)
    # every word (name parts, candidates) is distinct and none is inside another: a scan for a name finds only it
    words = [w for p in people for w in p.split()] + [c for cs in a.candidates.values() for c in cs]
    assert all(x == y or x.lower() not in y.lower() for x in words for y in words)
    for g in GROUPS:
        facts = a.of_group(g)
        assert {f.person for f in facts} == set(a.people[g]) and len(facts) == 3 * len(a.people[g])
        for attr in ("city", "pet", "food"):
            counts = Counter(f.answer for f in facts if f.attribute == attr)
            assert set(counts) <= set(a.candidates[attr])
            assert max(counts.values()) - min(counts.get(c, 0) for c in a.candidates[attr]) <= 1  # balanced
    assert all(len(cs) == 10 for cs in a.candidates.values())


def test_student_side_splits_hold_only_a_facts_and_evaluation_uses_held_out_templates():
    task = get_task("planted", {"people": {"A": 6, "B_val": 3, "B_test": 5}})
    held_out = task.held_out_strings()
    assert len(held_out) == 2 * (3 + 5)
    a_people = set(task.table.people["A"])
    for split in ("train", "seed", "extract", "align"):
        items = task.split(split)
        assert {it.metadata["person"] for it in items} <= a_people
        assert not [n for it in items for n in _names_in(it.prompt + it.response, held_out)], split
        assert {it.metadata["template"][:5] for it in items} == {"train"}
    assert len(task.split("train")) == 6 * 4 * 3  # every A fact with each of its 3 training templates
    assert len(task.split("plant")) == (6 + 3 + 5) * 4 * 3
    train_prompts = {it.prompt for it in task.split("plant")}
    for split, group in (("a_test", "A"), ("validation", "B_val"), ("test", "B_test")):
        items = task.split(split)
        facts = [it.metadata["fact"] for it in items]
        assert len(facts) == len(set(facts)) == len(task.table.of_group(group))  # each fact once
        assert all(it.metadata["template"].startswith("heldout") and it.prompt not in train_prompts for it in items)
        assert {it.metadata["template"] for it in items} == {"heldout0", "heldout1"}  # both paraphrases are used
        for it in items:
            template = ATTRIBUTES[it.metadata["attribute"]].test_templates[int(it.metadata["template"][-1])]
            assert it.prompt.startswith(template.format(name=it.metadata["person"]))
            assert it.reference in it.metadata["choices"] and len(it.metadata["choices"]) == 10
    assert task.protocol()["chance"] == 0.1


def test_the_fact_table_exports_as_jsonl_and_bad_parameters_are_refused(tmp_path):
    task = get_task("planted", SMALL)
    rows = [json.loads(line) for line in task.fact_jsonl().splitlines()]
    assert len(rows) == (4 + 2 + 3) * 2 and rows[0].keys() >= {"id", "group", "person", "attribute", "answer", "candidates"}
    assert {r["group"] for r in rows} == set(GROUPS)
    for bad, match in (
        ({"candidates": 5}, "under 10"),
        ({"attributes": ["colour"]}, "attributes"),
        ({"people": {"C": 3}}, "unknown group"),
        ({"people": {"A": 0}}, "positive integer"),
        ({"sizes": {"train": 3}}, "unknown split"),
        ({"primary": "f1"}, "primary"),
        ({"typo": 1}, "unknown option"),
    ):
        with pytest.raises(RecipeError, match=match):
            get_task("planted", bad)


def test_a_one_word_answer_is_matched_on_its_first_line_ignoring_case_and_final_punctuation():
    assert exact_match_word("Zorvel", "Zorvel") == ("Zorvel", True)
    assert exact_match_word("  zorvel.\nmore text", "Zorvel") == ("zorvel", True)
    assert exact_match_word("Zorvel!", "Zorvel") == ("Zorvel", True)
    assert exact_match_word("Zorvel is the city", "Zorvel") == ("Zorvel is the city", False)
    assert exact_match_word("", "Zorvel") == ("", False)


def _planted_recipe(tiny_recipe: dict, method: dict | None = None) -> dict:
    tiny_recipe["task"] = {"name": "planted", "validation": 4, "params": SMALL}
    tiny_recipe["training"]["max_length"] = 192
    tiny_recipe["evaluation"].update(splits=["test", "a_test"], max_new_tokens=4)
    if method is not None:
        tiny_recipe["method"] = method
    return tiny_recipe


def test_a_planted_evaluation_records_both_rankings_the_margin_and_a_greedy_answer(tiny_recipe):
    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    res = pktransfer.run(recipe_from_dict(_planted_recipe(tiny_recipe)), quiet=True)
    from pathlib import Path

    folder = Path(res.output_dir) / "eval"
    rows = [json.loads(line) for line in (folder / "trained.planted.test.items.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "trained.planted.test.summary.json").read_text())
    assert len(rows) == 6 and summary["protocol"]["chance"] == 0.1 and summary["protocol"]["max_new_tokens"] == 4
    for r in rows:
        ll = r["loglik"]
        assert len(ll) == 10 and r["reference"] in ll
        assert r["extracted_sum"] == max(ll, key=ll.get)
        assert r["extracted_norm"] == max(ll, key=lambda c: ll[c] / len(c.encode()))
        assert r["margin"] == pytest.approx(ll[r["reference"]] - max(v for c, v in ll.items() if c != r["reference"]))
        assert r["correct"] == (r["extracted_sum"] == r["reference"]) == r["correct_sum"]  # primary: acc
        assert isinstance(r["output"], str) and r["greedy_correct"] == exact_match_word(r["output"], r["reference"])[1]
    m = summary["metrics"]
    assert m["acc"] == summary["accuracy"] == sum(r["correct"] for r in rows) / 6
    assert m["acc_norm"] == sum(r["correct_norm"] for r in rows) / 6
    assert m["exact_match"] == sum(r["greedy_correct"] for r in rows) / 6
    assert summary["margin"]["mean"] == pytest.approx(sum(r["margin"] for r in rows) / 6)
    assert res.run["leak_guard"]["model_inputs_checked"] > 0 and res.run["leak_guard"]["found"] == 0


def _method_id(m: dict) -> str:
    if m["name"] == "compose":
        return f"{m['start']['name']}+{m['objective']['name']}"
    return m["name"] + ("-" + m["structure"] if "structure" in m else "")


@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_no_b_name_reaches_any_model_call_of_any_method(tiny_recipe, method, monkeypatch):
    """Every text a method hands to any model while it prepares and trains (decoded from the token ids the model's
    input embedding reads) is recorded; none may hold a B person's name, and the A people must be there (the scan
    sees the real inputs)."""
    import pktransfer
    from pktransfer.leakguard import LeakGuard
    from pktransfer.recipe import recipe_from_dict

    seen: list[tuple[str, str]] = []
    check = LeakGuard.check

    def recording(self, texts, role):
        seen.extend((role, t) for t in texts)
        return check(self, texts, role)

    monkeypatch.setattr(LeakGuard, "check", recording)
    recipe = _planted_recipe(tiny_recipe, dict(method))
    recipe["training"]["max_steps"] = 2
    recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(recipe_from_dict(recipe), quiet=True, evaluate=False)
    task = get_task("planted", SMALL)
    b_names, a_names = task.held_out_strings(), task.table.names(("A",))
    assert seen and not [(role, n) for role, t in seen for n in _names_in(t, b_names)]
    assert {n for _, t in seen for n in _names_in(t, a_names)}
    assert res.run["leak_guard"] == {"held_out_strings": len(b_names), "model_inputs_checked": len(seen), "found": 0}
    if method["name"] not in ("lora", "pissa", "weight_selection"):  # these read no teacher output
        assert "teacher" in {role for role, _ in seen}


def test_a_b_name_in_a_training_text_fails_the_run_with_one_clear_error(tiny_recipe, monkeypatch):
    import pktransfer
    from pktransfer.data.planted import PlantedTask
    from pktransfer.recipe import recipe_from_dict

    load = PlantedTask._load

    def leaky(self, split):
        items = load(self, split)
        return items + load(self, "test")[:1] if split == "train" else items

    monkeypatch.setattr(PlantedTask, "_load", leaky)
    recipe = _planted_recipe(tiny_recipe)
    recipe["evaluation"].update(teacher=False, student=False)
    with pytest.raises(DataError, match=r"held-out text reached the student while the method was in 'preparation and training'"):
        pktransfer.run(recipe_from_dict(recipe), quiet=True)


def test_the_guard_pauses_for_a_learning_curve_on_the_b_validation_facts(tiny_recipe):
    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    recipe = _planted_recipe(tiny_recipe)
    recipe["evaluation"].update(teacher=False, student=False, learning_curve=2)
    res = pktransfer.run(recipe_from_dict(recipe), quiet=True)
    assert len(res.run["training"]["learning_curve"]) == 2  # scored the B_val facts mid-training without a refusal


def _plant_recipe(tiny_recipe: dict, tmp_path, **plant) -> dict:
    recipe = _planted_recipe(tiny_recipe)
    recipe["plant"] = {
        "output_dir": str(tmp_path / "planted"),
        "training": {"epochs": 1, "lr": 1e-3, "batch_size": 8, "max_length": 192, "save_steps": 50},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        **plant,
    }
    return recipe


def test_plant_keeps_the_adapter_and_the_merged_teacher_and_records_recall(tiny_recipe, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    recipe = recipe_from_dict(_plant_recipe(tiny_recipe, tmp_path, min_recall=0.0))
    res = pktransfer.plant(recipe, quiet=True)
    out = res.output_dir
    assert out == tmp_path / "planted" and not (tmp_path / "planted.partial").exists()
    run = res.run
    assert set(run["metrics"]) == {"student", "teacher", "planted"}
    assert set(run["metrics"]["planted"]) == {"a_test", "validation", "test"}
    assert run["plant"]["items"] == (4 + 2 + 3) * 2 * 3 and run["plant"]["steps"] == math.ceil(54 / 8)
    assert len(run["untouched_at_chance"]) == 6 and all("p_above_chance" in r for r in run["untouched_at_chance"])
    # the merged teacher is the untouched teacher plus the adapter's delta
    base = AutoModelForCausalLM.from_pretrained(tiny_recipe["teacher"]["model"])
    with_delta = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    ids = torch.tensor([[5, 9, 14, 30, 41]])
    with torch.no_grad():
        assert torch.allclose(with_delta(ids).logits, merged(ids).logits, atol=1e-5)
    assert "Recall on held-out templates" in (out / "report.md").read_text()


def test_the_exact_merge_is_the_float64_sum_rounded_once_and_within_one_bf16_step_of_peft(tiny_recipe):
    """merge_lora_exact: every merged weight is bf16(W + s * B @ A) computed in float64 (hand-computed here), at most
    one bf16 rounding step from PEFT's float32 merge, and the LoRA modules are gone."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pktransfer.config import LoraSpec
    from pktransfer.models.arch import describe
    from pktransfer.training import lora_config, merge_lora_exact

    def lora_teacher():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_recipe["teacher"]["model"], dtype=torch.bfloat16)
        model = get_peft_model(base, lora_config(LoraSpec(r=4, alpha=8), describe(base)))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        return model

    model = lora_teacher()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w, a, b, s = layer.base_layer.weight.clone(), layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0
    expected = (w.double() + (b.double() @ a.double()) * s).to(torch.bfloat16)
    exact = merge_lora_exact(model)
    assert not any("lora" in n for n, _ in exact.named_parameters())
    got = exact.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(got, expected)
    peft_merged = lora_teacher().merge_and_unload().model.layers[0].self_attn.q_proj.weight
    step = torch.finfo(torch.bfloat16).eps * got.float().abs().clamp_min(1e-30)
    assert ((got.float() - peft_merged.float()).abs() <= step + 1e-12).all()


def test_plant_from_an_earlier_adapter_gives_the_same_teacher_without_training(tiny_recipe, tmp_path):
    """Another machine rebuilds a study's teacher from its committed adapter: the same adapter bytes, the same merged
    weights, the same recall, no training; a folder that is not an adapter, or one of another teacher, is refused."""
    import shutil

    import pktransfer
    from pktransfer.errors import RecipeError
    from pktransfer.recipe import recipe_from_dict

    first = pktransfer.plant(recipe_from_dict(_plant_recipe(tiny_recipe, tmp_path, min_recall=0.0)), quiet=True)
    kept = tmp_path / "committed-adapter"
    shutil.copytree(first.output_dir / "adapter", kept)
    again_recipe = _plant_recipe(tiny_recipe, tmp_path, min_recall=0.0)
    again_recipe["plant"]["output_dir"] = str(tmp_path / "again")
    again = pktransfer.plant(recipe_from_dict(again_recipe), quiet=True, from_adapter=kept)
    assert "steps" not in again.run["plant"] and not (again.output_dir / "checkpoints").exists()
    assert again.run["plant"]["adapter_sha256"] == first.run["plant"]["adapter_sha256"]
    assert again.run["models"]["planted"] == first.run["models"]["planted"]  # the merged weights' sha256
    assert again.run["metrics"]["planted"] == first.run["metrics"]["planted"]
    assert "the adapter of an earlier planting" in (again.output_dir / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"has no adapter_config\.json"):
        pktransfer.plant(recipe_from_dict(again_recipe), quiet=True, from_adapter=tmp_path / "empty", overwrite=True)
    other = _plant_recipe(tiny_recipe, tmp_path, min_recall=0.0, base={"model": tiny_recipe["student"]["model"]})
    other["plant"]["output_dir"] = str(tmp_path / "other")
    with pytest.raises(RecipeError, match="does not fit the teacher"):
        pktransfer.plant(recipe_from_dict(other), quiet=True, from_adapter=kept)
    assert not (tmp_path / "other").exists()


def test_plant_refuses_a_teacher_that_did_not_learn_the_test_facts_and_names_its_recall(tiny_recipe, tmp_path):
    import pktransfer
    from pktransfer.errors import PktError
    from pktransfer.recipe import recipe_from_dict

    recipe = recipe_from_dict(_plant_recipe(tiny_recipe, tmp_path, min_recall=0.99))
    with pytest.raises(PktError, match=r"recalls \d+\.\d% of the test facts .* under plant.min_recall 99%") as err:
        pktransfer.plant(recipe, quiet=True)
    assert "plant.training.epochs" in err.value.hint
    assert not (tmp_path / "planted").exists() and (tmp_path / "planted.partial" / "FAILED.json").is_file()
    assert not (tmp_path / "planted.partial" / "merged").exists()


def test_plant_refuses_a_task_without_facts_and_an_untouched_model_above_chance(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer
    from pktransfer import planting
    from pktransfer.errors import PktError
    from pktransfer.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="no facts to plant"):
        pktransfer.plant(recipe_from_dict(tiny_recipe), quiet=True)
    monkeypatch.setattr(planting, "above_chance", lambda correct, n, chance: 1e-9)
    with pytest.raises(PktError, match=r"untouched student is above chance on 'a_test'") as err:
        pktransfer.plant(recipe_from_dict(_plant_recipe(tiny_recipe, tmp_path)), quiet=True)
    assert "data_seed" in err.value.hint


def test_the_chance_check_by_hand():
    from pktransfer.planting import above_chance, chance_check

    # P(X >= 3 | n = 3, p = 0.1) = 0.001; P(X >= 0) = 1
    assert above_chance(3, 3, 0.1) == pytest.approx(0.001)
    assert above_chance(0, 10, 0.1) == pytest.approx(1.0)
    rows = chance_check(
        {"student": {"test": {"n": 3, "correct": 3, "accuracy": 1.0}, "a_test": {"n": 10, "correct": 1, "accuracy": 0.1}}},
        0.1,
        0.05,
    )
    assert [r["above_chance"] for r in rows] == [True, False]  # 0.001 < 0.05 / 2; 0.65 is not


def test_pkt_facts_prints_and_exports_the_table(tmp_path):
    from typer.testing import CliRunner

    from pktransfer.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: {name: planted, params: {people: {A: 2, B_val: 1, B_test: 1}, attributes: [city]}}\n")
    res = CliRunner().invoke(app, ["facts", str(recipe), "--jsonl", str(tmp_path / "facts.jsonl")])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "facts.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    res = CliRunner().invoke(app, ["facts", str(recipe)])
    assert res.exit_code == 0 and re.search(r"B_test", res.output)


def test_the_positive_control_trains_on_every_fact_and_holds_nothing_back():
    task = get_task("planted", {**SMALL, "train_on": "all"})
    assert task.held_out_strings() == []
    people = {it.metadata["person"] for it in task.split("train")}
    assert people == {p for g in GROUPS for p in task.table.people[g]}
    assert len(task.split("train")) == len(task.split("plant"))
    assert [it.prompt for it in task.split("test")] == [it.prompt for it in get_task("planted", SMALL).split("test")]
    with pytest.raises(RecipeError, match="train_on"):
        get_task("planted", {"train_on": "B"})


def test_a_resumed_planting_reuses_its_evaluations_and_an_older_record_of_the_same_recipe(tiny_recipe, tmp_path, monkeypatch):
    """A planting stopped after scoring resumes: the untouched models are not scored again, and a folder recorded
    before fields were added (at the defaults that compute what it computed) still matches its recipe."""
    import json

    import pktransfer
    import pktransfer.planting as planting
    from pktransfer.errors import PktError
    from pktransfer.recipe import recipe_from_dict

    recipe = recipe_from_dict(_plant_recipe(tiny_recipe, tmp_path, min_recall=0.99))
    with pytest.raises(PktError, match=r"under plant\.min_recall"):
        pktransfer.plant(recipe, quiet=True)
    marker_path = tmp_path / "planted.partial" / ".pktransfer.json"
    marker = json.loads(marker_path.read_text())
    assert set(marker["recipe"]) == {"teacher", "student", "task", "seed", "planting"}  # what a planting depends on
    del marker["recipe"]["planting"]["training"]["loss_averaging"]  # as recorded before this field existed
    marker["recipe"]["training"] = {"lr": 0.5}  # older versions recorded every section: no longer counted
    marker["recipe_sha256"] = "recorded-by-an-older-version"
    marker_path.write_text(json.dumps(marker))
    for done in (tmp_path / "planted.partial" / "eval").glob("planted.*"):
        done.unlink()  # as if stopped before the planted teacher was scored

    labels = []
    real = planting.evaluate_items
    monkeypatch.setattr(planting, "evaluate_items", lambda *a, **k: labels.append(k["label"]) or real(*a, **k))
    with pytest.raises(PktError, match=r"under plant\.min_recall"):  # resumed, not refused as another recipe
        pktransfer.plant(recipe, quiet=True)
    assert set(labels) == {"planted"}


def test_each_entry_against_chance_by_hand():
    from pktransfer.study.analysis import against_chance

    ids = [f"q{i}" for i in range(10)]
    one_right = {i: float(i == "q0") for i in ids}  # 1 of 10: exactly chance on every resample of seeds
    records = [{"label": "lora", "seed": s, "items": {"test": dict(one_right)}, "metrics": {"test": 0.1}} for s in (0, 1)] + [
        {"label": "all", "seed": s, "items": {"test": dict.fromkeys(ids, 1.0)}, "metrics": {"test": 1.0}} for s in (0, 1)
    ]
    out = against_chance(records, ["lora", "all"], ["test"], 0.1, resamples=1000, seed=0, alpha=0.05, adjustment="holm")
    lora, best = out["by_metric"]["test"]["lora"], out["by_metric"]["test"]["all"]
    assert best["mean_diff"] == pytest.approx(0.9) and best["ci_low"] == best["ci_high"] == pytest.approx(0.9)
    assert best["p_two_sided"] == 0.0 and best["p_adjusted"] == 0.0 and best["survives"]
    assert lora["mean_diff"] == pytest.approx(0.0) and lora["n_items"] == 10 and lora["n_seeds"] == 2
    assert lora["ci_low"] < 0 < lora["ci_high"] and not lora["survives"]  # items resampled: q0 drawn 0..k times
    assert lora["p_adjusted"] == max(lora["p_two_sided"], best["p_adjusted"])  # Holm: the larger p is multiplied by 1
    assert out["chance"] == 0.1 and out["adjustment"] == "holm"


def test_a_planted_grid_reports_every_entry_against_chance_and_other_tasks_are_refused(tiny_recipe, tmp_path):
    import pktransfer
    from pktransfer.recipe import recipe_from_dict

    arithmetic = json.loads(json.dumps(tiny_recipe))
    recipe = _planted_recipe(tiny_recipe)
    recipe["evaluation"].update(teacher=False, student=False, splits=["test"])
    recipe["compare"] = {"methods": ["lora", "pissa"], "seeds": [0], "against_chance": True}
    res = pktransfer.compare(recipe_from_dict(recipe), quiet=True)
    chance = res.result["against_chance"]
    assert chance["chance"] == 0.1 and set(chance["by_metric"]["test"]) == {"lora", "pissa"}
    for label, row in chance["by_metric"]["test"].items():
        cell = next(c for c in res.result["cells"] if c["label"] == label)
        assert row["mean_diff"] == pytest.approx(cell["metrics"]["test"] - 0.1)
    md = (res.output_dir / "compare.md").read_text()
    assert "## Against chance" in md and "| lora | 1 |" in md
    arithmetic["output_dir"] = str(tmp_path / "arith")
    arithmetic["compare"] = {"methods": ["lora"], "seeds": [0], "against_chance": True}
    with pytest.raises(RecipeError, match="declares no chance level"):
        pktransfer.compare(recipe_from_dict(arithmetic), quiet=True)
    assert not (tmp_path / "arith").exists()
