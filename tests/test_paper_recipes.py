"""Every recipe under recipes/papers/ runs end to end on tiny random models of its family, with size overrides only.

The overrides shrink what a tiny model cannot hold (the pair, the number of items and steps, the generation budget and
the located sample counts) and keep everything that makes the recipe a reproduction: the task, its protocol and
prompt format, the method and its official options, the LoRA targets, the schedule's shape and the seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, "tests")
from conftest import make_model, make_tokenizer, needs_data

from pktransfer.recipe import apply_overrides, recipe_from_dict

PAPERS = sorted(Path("recipes/papers").glob("*.yaml"))
SHRINK = {
    "seeking": {"method.n_seed": 2},
    "laten": {"method.n_extract": 2, "method.checkpoint": 0, "method.locate_vocab": 16},
    "semalign": {"method.n_seed": 2, "method.critical_layers": 2},
}


@pytest.fixture(scope="module")
def tiny_llama_pair(tmp_path_factory) -> dict[str, Path]:
    """Llama-family teacher and student (the papers' family) with room for 8-shot prompts in characters."""
    root = tmp_path_factory.mktemp("paper_pair")
    out = {}
    for name, shape, seed in (
        ("teacher", dict(hidden=64, layers=4, heads=4, kv_heads=4, ffn=128), 1),
        ("student", dict(hidden=32, layers=2, heads=4, kv_heads=4, ffn=64), 2),
    ):
        tok = make_tokenizer(True)
        model = make_model("llama", vocab=len(tok), seed=seed, positions=4096, **shape)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_every_paper_recipe_names_its_table_and_costs():
    assert len(PAPERS) >= 11
    for path in PAPERS:
        head = path.read_text().split("\nteacher:", 1)[0]
        assert "reported" in head.lower() or "Reported" in head, path
        assert "Needs" in head and "pkt run recipes/papers/" in head, path
        recipe = recipe_from_dict(yaml.safe_load(path.read_text()), str(path))
        assert recipe.teacher.model.startswith("meta-llama/Llama-2-13b") and recipe.student.model.startswith(
            "meta-llama/Llama-2-7b"
        )
        assert recipe.task.prompt_format == "tulu"


@needs_data
@pytest.mark.parametrize("path", PAPERS, ids=[p.stem for p in PAPERS])
def test_paper_recipe_runs_on_a_tiny_pair(path, tiny_llama_pair, tmp_path):
    import pktransfer

    raw = yaml.safe_load(path.read_text())
    overrides = {
        "teacher.model": str(tiny_llama_pair["teacher"]),
        "student.model": str(tiny_llama_pair["student"]),
        "teacher.dtype": "float32",
        "student.dtype": "float32",
        "task.n_train": 4,
        "training.max_steps": 2,
        "evaluation.limit": 2,
        "evaluation.max_new_tokens": 4,
        "evaluation.batch_size": 2,
        "evaluation.teacher": False,
        "output_dir": str(tmp_path / "run"),
        **SHRINK[raw["method"]["name"]],
    }
    if raw["evaluation"].get("n_samples"):
        overrides["evaluation.n_samples"] = 2
    data = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    recipe = recipe_from_dict(data, str(path))
    result = pktransfer.run(recipe, quiet=True)
    run = json.loads((Path(result.output_dir) / "run.json").read_text())
    assert run["status"] == "finished"
    assert run["prompt_format"]["mode"] == "tulu"
    items = next((Path(result.output_dir) / "eval").glob("*.test.items.jsonl")).read_text().splitlines()
    first = json.loads(items[0])
    assert first["model_input"]  # the exact text the model read is kept with every record
    if recipe.evaluation.n_samples > 1:  # Open-Instruct's HumanEval sampling reaches generation
        summary = json.loads(next((Path(result.output_dir) / "eval").glob("*.test.summary.json")).read_text())
        assert summary["sampling"]["temperature"] == 0.1 and summary["sampling"]["top_p"] == recipe.evaluation.top_p == 0.95


@pytest.mark.integration
@needs_data
@pytest.mark.parametrize("path", PAPERS, ids=lambda p: p.stem)
def test_every_paper_recipe_header_is_its_plan(path, monkeypatch):
    """The `# Needs` lines are `pkt plan --device cuda --gpu H100 --header` of the recipe (lengths measured with the
    offline student's tokenizer: the Llama-2 one is gated), so a header cannot drift from the code that plans it."""
    from pktransfer.plan import header_lines, make_plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = recipe_from_dict(yaml.safe_load(path.read_text()), str(path))
    plan = make_plan(recipe, "cuda", "H100", tokenizer="builtin:qwen2.5-coder-0.5b-instruct")
    lines = path.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("# Needs"))
    expected = header_lines(plan)
    assert lines[start : start + len(expected)] == expected, "\n".join(expected)
