"""pkt diagnose on tiny random pairs of every supported family, and on identity pairs."""

import json

import pytest
from typer.testing import CliRunner

import pktransfer
from pktransfer.cli import app
from pktransfer.diagnosis import DiagnoseSettings
from pktransfer.recipe import recipe_from_dict

SETTINGS = DiagnoseSettings(items=8, backward_items=2, locate_items=1, locate_vocab=None, batch_size=4, max_length=192)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text", "olmo2", "phi3"])
def test_diagnose_writes_every_measure_on_a_tiny_pair(family, tiny_models, tiny_recipe, tmp_path):
    from conftest import STUDENT_SHAPE, TEACHER_SHAPE, save_tiny

    if family not in ("qwen2", "llama"):
        teacher = save_tiny(tmp_path, f"{family}_teacher", family, seed=7, **TEACHER_SHAPE)
        student = save_tiny(tmp_path, f"{family}_student", family, seed=8, **STUDENT_SHAPE)
    else:
        teacher, student = tiny_models[f"{family}_teacher"], tiny_models[f"{family}_student"]
    assert STUDENT_SHAPE["layers"] < TEACHER_SHAPE["layers"]
    tiny_recipe["teacher"]["model"], tiny_recipe["student"]["model"] = str(teacher), str(student)
    res = pktransfer.diagnose(recipe_from_dict(tiny_recipe), settings=SETTINGS, quiet=True)
    out = res.output_dir / "diagnose"
    r = json.loads((out / "diagnose.json").read_text())
    assert len(r["cka"]) == TEACHER_SHAPE["layers"] and len(r["cka"][0]) == STUDENT_SHAPE["layers"]
    for key in ("cka", "cka_all_tokens"):  # response tokens, and every token: two different estimates
        assert all(-1.0 <= v <= 1.0 + 1e-9 for row in r[key] for v in row)
        assert any(abs(v) > 1e-6 for row in r[key] for v in row)
    assert r["cka"] != r["cka_all_tokens"]
    assert {v["method"] for v in r["verdicts"]} == {"seeking", "semalign", "laten"}
    assert len(r["pairings"]["seeking"]) == STUDENT_SHAPE["layers"] == len(r["pairings"]["laten"])
    # the dual round trip is exact within one model (tiny heads are tall: vocab > hidden)
    for who in ("teacher_self", "student_self"):
        assert all(v == pytest.approx(1.0, abs=1e-3) for v in r["fidelity"][who]["dual"])
    shares = r["seeking"]["per_role"]
    assert set(shares) == {"q", "k", "v", "o", "gate", "up", "down"}
    for v in shares.values():  # the max-sum block holds at least what a random block of its shape does
        assert v["submatrix"] >= v["random"] - 1e-12 and 0 < v["submatrix"] <= 1
    for name in ("report.md", "cka.png", "fidelity.png"):
        assert (out / name).stat().st_size > 0
    run = json.loads((res.output_dir / "run.json").read_text())
    assert run["verb"] == "diagnose" and run["seconds"]["total"] > 0 and "versions" in run


def test_an_identical_pair_has_cka_one_on_the_diagonal_and_exact_dual_fidelity(tiny_models, tiny_recipe, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_models["qwen2_teacher"], tmp_path / "same_weights")  # a transfer needs two folders
    tiny_recipe["teacher"]["model"], tiny_recipe["student"]["model"] = str(tiny_models["qwen2_teacher"]), str(copy)
    res = pktransfer.diagnose(recipe_from_dict(tiny_recipe), settings=SETTINGS, quiet=True)
    r = res.run
    d = json.loads((res.output_dir / "diagnose" / "diagnose.json").read_text())
    n = len(d["cka"])
    assert all(d["cka"][i][i] == pytest.approx(1.0, abs=1e-9) for i in range(n))
    assert all(d["cka_all_tokens"][i][i] == pytest.approx(1.0, abs=1e-9) for i in range(n))
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in d["fidelity"]["cross"]["dual"])
    # with equal depths SemAlign's grid is the diagonal, and Seeking keeps every layer in order
    assert d["pairings"]["semalign_grid"] == [[k, k] for k in range(1, n + 1)]
    assert d["pairings"]["seeking"] == [[k, k] for k in range(1, n + 1)]
    assert d["best_teacher_layer_per_student_layer"] == list(range(1, n + 1))
    assert r["verdicts"]


def test_pkt_diagnose_cli_prints_the_verdicts_and_refuses_bad_counts(tiny_recipe, tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    bad = CliRunner().invoke(app, ["diagnose", str(path), "--items", "0", "-q"])
    assert bad.exit_code == 2 and "--items must be at least 1" in bad.output and "Traceback" not in bad.output
    ok = CliRunner().invoke(app, ["diagnose", str(path), "--items", "4", "--backward-items", "1", "--locate-items", "1", "-q"])
    assert ok.exit_code == 0, ok.output
    assert "diagnosis" in ok.output and "report" in ok.output
    assert "| semalign |" in (tmp_path / "run" / "diagnose" / "report.md").read_text()
