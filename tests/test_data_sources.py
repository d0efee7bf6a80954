"""Benchmark data for a user outside this repository: the hub (through ``datasets``) and the papers' own
files give exactly the items (and sha256) the local JSONL copies give."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import pytest
from conftest import DATA, needs_data

from pktransfer.data import get_task
from pktransfer.data import sources as src
from pktransfer.errors import DataError
from pktransfer.evaluation.evaluate import items_sha256

datasets = pytest.importorskip("datasets", reason="the hub path needs the 'datasets' package (pktransfer[hub])")

pytestmark = needs_data


def _rows(rel: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / rel).read_text().split("\n") if line.strip()]


def _hub_folder(root: Path, config: str, splits: dict[str, list[dict]]) -> Path:
    """A dataset folder laid out like the hub's (README configs + parquet per split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    schema = pa.Table.from_pylist([r for rows in splits.values() for r in rows]).schema  # one schema, as on the hub
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, rows in splits.items():
        (root / config).mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / config / f"{split}-00000-of-00001.parquet")
        lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    return root


@pytest.fixture
def hub_mirror(tmp_path, monkeypatch):
    """Local folders in the hub's own format for gsm8k, mmlu and mbpp, read with no network."""
    gsm = _hub_folder(
        tmp_path / "hub" / "gsm8k", "main", {"train": _rows("gsm8k/train.jsonl"), "test": _rows("gsm8k/test.jsonl")}
    )
    mmlu_splits = {
        s: [{**r, "answer": "ABCD".index(r["answer"])} for r in _rows(f"mmlu/{s}.jsonl")] for s in ("test", "validation", "dev")
    }
    mmlu = _hub_folder(tmp_path / "hub" / "mmlu", "all", mmlu_splits)
    mbpp_rows = _rows("mbpp/mbpp.jsonl")
    ranges = {"train": (601, 974), "test": (11, 510), "validation": (511, 600), "prompt": (1, 10)}
    mbpp = _hub_folder(
        tmp_path / "hub" / "mbpp",
        "full",
        {s: [r for r in mbpp_rows if lo <= r["task_id"] <= hi] for s, (lo, hi) in ranges.items()},
    )
    repos = {"openai/gsm8k": gsm, "cais/mmlu": mmlu, "google-research-datasets/mbpp": mbpp}
    patched = {
        rel: dataclasses.replace(s, repo=str(repos[s.repo])) if isinstance(s, src.HubSource) else s
        for rel, s in src.CATALOG.items()
    }
    monkeypatch.setattr(src, "CATALOG", patched)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("PKT_CACHE", str(tmp_path / "pkt-cache"))
    monkeypatch.delenv("PKT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("task", "params", "split"),
    [
        ("gsm8k", {}, "test"),
        ("gsm8k", {"shots": 8}, "test"),
        ("mmlu", {"shots": 5, "exclude_seen": False}, "test"),  # the exclusion reads the papers' files (not mirrored here)
        ("mmlu", {}, "validation"),
        ("mbpp", {}, "test"),
        ("mbpp", {}, "train"),
    ],
)
def test_hub_items_equal_the_local_copy(hub_mirror, task, params, split):
    local = get_task(task, params, data_dir=str(DATA)).split(split)
    cached_task = get_task(task, params)
    assert cached_task.data_dir() == src.data_cache()
    hub = cached_task.split(split)
    assert [it.to_dict() for it in hub] == [it.to_dict() for it in local]
    assert items_sha256(hub) == items_sha256(local)
    source = cached_task.data_source(split)
    rel = next(iter(source))
    assert source[rel]["kind"] == "cache" and source[rel]["source"]["kind"] == "hub"
    assert Path(source[rel]["source"]["repo"]).name in ("gsm8k", "mmlu", "mbpp") and source[rel]["source"]["revision"]


def test_a_local_folder_always_wins(hub_mirror, monkeypatch):
    monkeypatch.setenv("PKT_DATA_DIR", str(DATA))
    task = get_task("gsm8k")
    assert task.data_dir() == DATA
    assert task.data_source("test")["gsm8k/test.jsonl"] == {"kind": "local", "path": str(DATA / "gsm8k/test.jsonl")}
    assert not src.data_cache().exists()


def _fake_urlopen(payloads: dict[str, bytes]):
    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def urlopen(url, timeout=None):
        if url not in payloads:
            raise OSError("no network here")
        return Resp(payloads[url])

    return urlopen


def test_paper_files_are_fetched_at_their_commit_and_checked(hub_mirror, monkeypatch):
    rels = [
        "seeking/gsm/sample_gsm.jsonl",
        "laten/gsm/gsm_extract_split.jsonl",
        "laten/gsm/gsm_align_split.jsonl",
        "seeking/gsm/gsm_data_1000.jsonl",
    ]
    payloads = {src.CATALOG[r].url: (DATA / r).read_bytes() for r in rels}
    for r in rels:
        assert hashlib.sha256(payloads[src.CATALOG[r].url]).hexdigest() == src.CATALOG[r].sha256
    monkeypatch.setattr(src.urllib.request, "urlopen", _fake_urlopen(payloads))
    for split in ("seed", "extract", "align", "train"):
        hub = get_task("gsm8k").split(split)
        assert items_sha256(hub) == items_sha256(get_task("gsm8k", data_dir=str(DATA)).split(split))
    record = json.loads((src.data_cache() / "laten/gsm/gsm_align_split.jsonl.source.json").read_text())
    assert record["kind"] == "paper" and record["commit"] == src.LATEN_COMMIT


def test_a_changed_published_file_is_refused(hub_mirror, monkeypatch):
    rel = "seeking/gsm/sample_gsm.jsonl"
    monkeypatch.setattr(src.urllib.request, "urlopen", _fake_urlopen({src.CATALOG[rel].url: b'{"x": 1}\n'}))
    with pytest.raises(DataError, match="sha256"):
        get_task("gsm8k").split("seed")
    assert not (src.data_cache() / rel).exists()


def test_offline_without_a_cached_copy_says_how_to_get_it(hub_mirror, monkeypatch):
    missing = {
        rel: dataclasses.replace(s, repo=str(hub_mirror / "nowhere")) if isinstance(s, src.HubSource) else s
        for rel, s in src.CATALOG.items()
    }
    monkeypatch.setattr(src, "CATALOG", missing)
    with pytest.raises(DataError, match="could not load") as err:
        get_task("gsm8k").split("test")
    assert "pkt data fetch" in err.value.hint


def test_pkt_data_list_and_fetch(hub_mirror, monkeypatch):
    from typer.testing import CliRunner

    from pktransfer.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "pktransfer's cache" in res.output
    assert "gsm8k/test.jsonl" in res.output and " no " in res.output.replace("│", " ")
    res = runner.invoke(app, ["data", "fetch", "mmlu"])
    assert res.exit_code == 2  # the paper files of mmlu cannot be downloaded here: one clear error
    assert (src.data_cache() / "mmlu" / "test.jsonl").is_file()  # the hub files before it were prepared
    res = runner.invoke(app, ["data", "fetch", "nope"])
    assert res.exit_code == 2 and "not a benchmark" in res.output + (res.stderr or "")


def test_every_hub_source_is_pinned_to_a_commit():
    import re

    hub = {rel: s for rel, s in src.CATALOG.items() if isinstance(s, src.HubSource)}
    assert {s.repo for s in hub.values()} == {"openai/gsm8k", "cais/mmlu", "google-research-datasets/mbpp"}
    for rel, s in hub.items():
        assert re.fullmatch(r"[0-9a-f]{40}", s.revision), (rel, s.revision)  # a commit, never a branch such as main
        assert s.describe().endswith("@" + s.revision)
