from __future__ import annotations

import json

import pytest
from conftest import DATA, needs_data

from pktransfer.data import get_task, resolve_data_dir
from pktransfer.errors import DataError, RecipeError


def _key(item):
    m = item.metadata
    return (m["op"], min(m["a"], m["b"]), max(m["a"], m["b"]))


def test_arithmetic_splits_never_overlap_even_up_to_commutativity():
    task = get_task("arithmetic")
    seen = {}
    for split in task.splits:
        for item in task.split(split):
            k = _key(item)
            assert k not in seen, f"{item.prompt} in {split} and {seen[k]}"
            seen[k] = split


def test_arithmetic_is_deterministic_and_answers_are_right():
    a, b = get_task("arithmetic"), get_task("arithmetic")
    assert [i.prompt for i in a.split("test")] == [i.prompt for i in b.split("test")]
    for item in a.split("train")[:50]:
        m = item.metadata
        assert int(item.reference) == (m["a"] + m["b"] if m["op"] == "add" else m["a"] * m["b"])
        assert item.response == item.reference
    c = get_task("arithmetic", {"data_seed": 99})
    assert [i.prompt for i in c.split("test")] != [i.prompt for i in a.split("test")]


def test_test_split_does_not_depend_on_train_size():
    small = get_task("arithmetic", {"sizes": {"train": 10}})
    big = get_task("arithmetic", {"sizes": {"train": 500}})
    assert [i.prompt for i in small.split("test")] == [i.prompt for i in big.split("test")]
    assert len(small.split("train")) == 10


def test_arithmetic_is_balanced_and_digits_respected():
    sizes = {"test": 10, "seed": 4, "extract": 4, "align": 4, "train": 20}
    t = get_task("arithmetic", {"digits": {"add": 2, "mul": 1}, "sizes": sizes})
    ops = [i.metadata["op"] for i in t.split("test")]
    assert ops.count("add") == ops.count("mul") == 5
    for i in t.split("test"):
        m = i.metadata
        limit = 100 if m["op"] == "add" else 10
        assert m["a"] < limit and m["b"] < limit


def test_arithmetic_bad_params():
    with pytest.raises(RecipeError, match="unknown operation"):
        get_task("arithmetic", {"ops": ["div"]})
    with pytest.raises(RecipeError, match="unknown option"):
        get_task("arithmetic", {"colour": 1})
    with pytest.raises(RecipeError, match="distinct 'mul' problems"):
        get_task("arithmetic", {"digits": {"add": 3, "mul": 1}})  # 45 one-digit products, 616 needed


def test_unknown_task_lists_tasks():
    with pytest.raises(RecipeError, match=r"available tasks: .*arithmetic"):
        get_task("nope")


def test_jsonl_task_reads_chat_and_flat_rows(tmp_path):
    chat = tmp_path / "train.jsonl"
    chat.write_text(
        json.dumps({"id": "a", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}) + "\n"
    )
    flat = tmp_path / "test.jsonl"
    flat.write_text(json.dumps({"prompt": "2+2?", "response": "4", "reference": "4"}) + "\n")
    t = get_task("jsonl", {"train": str(chat), "test": str(flat)})
    assert t.split("train")[0].prompt == "Q" and t.split("train")[0].response == "A"
    assert t.split("test")[0].reference == "4"
    with pytest.raises(DataError, match="no split 'seed'"):
        t.split("seed")


def test_missing_and_corrupt_files(tmp_path):
    t = get_task("jsonl", {"train": str(tmp_path / "missing.jsonl")})
    with pytest.raises(DataError, match="missing"):
        t.split("train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{broken\n')
    with pytest.raises(DataError, match="line 2"):
        get_task("jsonl", {"train": str(bad)}).split("train")


def test_missing_data_dir_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PKT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"PKT_DATA_DIR"):
        resolve_data_dir()
    with pytest.raises(DataError, match=r"task\.data_dir"):
        get_task("gsm8k", data_dir=str(tmp_path / "nope")).split("test")


def test_data_dir_without_the_files_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl"):
        get_task("gsm8k", data_dir=str(tmp_path)).split("test")


@needs_data
def test_gsm8k_from_the_benchmark_data():
    t = get_task("gsm8k", data_dir=str(DATA))
    test = t.split("test")
    assert len(test) == 1319 and test[0].reference == "18"
    assert len(t.split("seed")) == 32 and len(t.split("extract")) == 20 and len(t.split("align")) == 80
    assert all(i.reference.lstrip("-").replace(".", "").isdigit() for i in t.split("train"))
    train_q = {i.prompt for i in t.split("train")}
    assert not train_q & {i.prompt for i in test}
