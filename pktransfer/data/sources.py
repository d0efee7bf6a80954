"""Where every benchmark data file comes from, and how a user without a local copy gets it.

Benchmark tasks read JSONL files in one layout (``gsm8k/test.jsonl``, ``mmlu/dev.jsonl``,
``seeking/gsm/...``). The folder is, in this order: ``task.data_dir``, ``$PKT_DATA_DIR``, else
pktransfer's cache (``$PKT_CACHE/data``). A local folder always wins. In the cache, a missing file is
prepared from its public source:

- evaluation sets from the Hugging Face hub through ``datasets`` (the ``hub`` extra), converted row by
  row to the layout's fields, so items and their sha256 are the same whichever way a split was loaded;
  with ``HF_DATASETS_OFFLINE=1`` this works from the ``datasets`` cache;
- the papers' training / seed / extract / align files from the repositories the papers published, at
  the commit the local copies were taken from, checked against their sha256.

Each prepared file gets a ``FILE.source.json`` beside it that evaluation summaries quote.
``pkt data list`` shows every file's source and whether it is present; ``pkt data fetch TASK`` prepares
a task's files ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pktransfer.errors import DataError

LETTERS = "ABCD"
SEEKING_REPO, SEEKING_COMMIT = "maszhongming/ParaKnowTransfer", "1a104a2ed9718528bf6b4b4020f981c6c1f8bef7"
LATEN_REPO, LATEN_COMMIT = "Trae1ounG/Neural_Incompatibility", "bba32ea1b6f0b78d3b0ccbcd9c8dd0f08a23e318"


@dataclass(frozen=True)
class HubSource:
    """Rows of a hub dataset (one or more splits, concatenated) converted to the layout's fields."""

    repo: str
    config: str | None
    splits: tuple[str, ...]
    convert: str  # name in CONVERTERS
    revision: str  # a commit of the dataset's hub repository, never a branch: `main` can change under a study

    def describe(self) -> str:
        return f"hub {self.repo} {self.config or 'default'}/{'+'.join(self.splits)}@{self.revision}"


@dataclass(frozen=True)
class UrlSource:
    """A file published by a paper's authors, pinned to a commit and checked by sha256."""

    repo: str
    commit: str
    path: str
    sha256: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"

    def describe(self) -> str:
        return f"paper {self.repo}@{self.commit[:8]}"


Source = HubSource | UrlSource


def _gsm8k(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def _mmlu(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [
        {
            "subject": r["subject"],
            "question": r["question"],
            "choices": list(r["choices"]),
            "answer": LETTERS[int(r["answer"])] if not isinstance(r["answer"], str) else r["answer"],
        }
        for r in rows
    ]
    return sorted(out, key=lambda r: r["subject"])  # stable: the source's order within a subject


def _mbpp(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("text", "code", "task_id", "test_setup_code", "test_list", "challenge_test_list")
    return sorted(({k: r[k] for k in keys} for r in rows), key=lambda r: r["task_id"])


CONVERTERS: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {"gsm8k": _gsm8k, "mmlu": _mmlu, "mbpp": _mbpp}


def _paper(repo: str, commit: str, folder: str, name: str, sha256: str) -> UrlSource:
    return UrlSource(repo, commit, f"data/{folder}/{name}", sha256)


# The hub datasets' commits: the ones many public evaluation setups pin (lighteval's MMLU task pins this cais/mmlu
# commit) and their Hugging Face cache snapshot folders name. No hub is reachable where this catalog was written, so
# they were not downloaded here: the items' sha256 in every summary is what proves two runs scored the same items.
GSM8K_REVISION = "740312add88f781978c0658806c59bc2815b9866"
MMLU_REVISION = "c30699e8356da336a370243923dbaf21066bb9fe"
MBPP_REVISION = "4bb6404fdc6cacfda99d4ac4205087b89d32030c"

CATALOG: dict[str, Source] = {
    "gsm8k/test.jsonl": HubSource("openai/gsm8k", "main", ("test",), "gsm8k", GSM8K_REVISION),
    "gsm8k/train.jsonl": HubSource("openai/gsm8k", "main", ("train",), "gsm8k", GSM8K_REVISION),
    "mmlu/test.jsonl": HubSource("cais/mmlu", "all", ("test",), "mmlu", MMLU_REVISION),
    "mmlu/validation.jsonl": HubSource("cais/mmlu", "all", ("validation",), "mmlu", MMLU_REVISION),
    "mmlu/dev.jsonl": HubSource("cais/mmlu", "all", ("dev",), "mmlu", MMLU_REVISION),
    "mbpp/mbpp.jsonl": HubSource(
        "google-research-datasets/mbpp", "full", ("train", "test", "validation", "prompt"), "mbpp", MBPP_REVISION
    ),
    **{
        f"seeking/{folder}/{name}": _paper(SEEKING_REPO, SEEKING_COMMIT, folder, name, sha)
        for folder, name, sha in (
            ("gsm", "gsm_data_1000.jsonl", "60f942f8782a8c6b25b93ae5cbf584d0f7ea27105d58f7a9abe4416eb81432e9"),
            ("gsm", "sample_gsm.jsonl", "376c0d1d63814232c9d9e79399f2dc0667ccf608407d232846df9b8ecbbae5f7"),
            ("mmlu", "mmlu_data_1000.jsonl", "667e9d45b80483bf5ddd3aaeeb6a8e04946d673c61598539d26821115d3c1689"),
            ("mmlu", "sample_mmlu.jsonl", "f9840d9ba13b2fd32a6542d23a49b8df6da1cec381ed9da6ffe22b77421b56e1"),
            ("super_ni", "super_ni_data_1000.jsonl", "68d09cd5764643ffd69f49b9d1778523a49f360c6801dca5aa88737bbca68586"),
            ("super_ni", "sample_super_ni.jsonl", "9c28eef5bbe58e14aa1efd3c3607182dd29e1f801c1fbfe088acce6b8a9fd524"),
        )
    },
    **{
        f"laten/{folder}/{name}": _paper(LATEN_REPO, LATEN_COMMIT, folder, name, sha)
        for folder, name, sha in (
            ("gsm", "gsm_extract_split.jsonl", "d70e084b0fbdeb1eb029742ab686967bfc6f47e86082344dd89134fd8c9ff047"),
            ("gsm", "gsm_align_split.jsonl", "bfd9184c4830035e8b4f0e6f255794be1d62dd08193f42360332f17ca421786c"),
            ("mmlu", "mmlu_extract_split.jsonl", "a1eda542fca105e6f64d0d143d89ebec31178f787e837c30f3044c462d3df1bb"),
            ("mmlu", "mmlu_align_split.jsonl", "8eaa715a27052ed983a7d4746daeed1fe9851b89aca86a09935eae8f03286102"),
        )
    },
}


def data_cache() -> Path:
    from pktransfer.models.builtin import cache_dir

    return cache_dir() / "data"


def _source_record(path: Path) -> Path:
    return path.with_name(path.name + ".source.json")


def describe_file(root: Path, rel: str, in_cache: bool) -> dict[str, Any]:
    """Where ``rel`` comes from (for summaries): the local file, or the cache with its recorded source."""
    path = root / rel
    if in_cache:
        try:
            return {"kind": "cache", "path": str(path), "source": json.loads(_source_record(path).read_text())}
        except (OSError, ValueError):
            pass
    return {"kind": "local", "path": str(path)}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from pktransfer.fileio import write_text

    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _fetch_hub(src: HubSource) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"preparing this file from the hub needs the 'datasets' package ({src.describe()})",
            hint="pip install 'pktransfer[hub]', or set PKT_DATA_DIR to a local copy of the data",
        ) from None
    rows: list[dict[str, Any]] = []
    fingerprints = []
    for split in src.splits:
        try:
            ds = datasets.load_dataset(src.repo, src.config, split=split, revision=src.revision)
        except Exception as err:  # datasets raises many types (connection, offline mode, not found)
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            raise DataError(
                f"could not load {src.describe()}: {str(err).splitlines()[0][:200]}",
                hint=("offline mode: run `pkt data fetch` once while online, " if offline else "check the network, ")
                + "or set PKT_DATA_DIR to a local copy of the data",
            ) from None
        rows.extend(dict(r) for r in ds)
        fingerprints.append(getattr(ds, "_fingerprint", None))
    return CONVERTERS[src.convert](rows), {
        "kind": "hub",
        "repo": src.repo,
        "config": src.config,
        "splits": list(src.splits),
        "revision": src.revision,
        "datasets_version": datasets.__version__,
        "fingerprints": fingerprints,
    }


def _fetch_url(src: UrlSource) -> tuple[bytes, dict[str, Any]]:
    try:
        with urllib.request.urlopen(src.url, timeout=60) as resp:
            data = resp.read()
    except OSError as err:
        raise DataError(
            f"could not download {src.describe()}: {err}",
            hint="check the network, or set PKT_DATA_DIR to a local copy of the data",
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != src.sha256:
        raise DataError(
            f"{src.describe()} has sha256 {digest}, expected {src.sha256}",
            hint="the published file changed or the download was corrupted; use a local copy (PKT_DATA_DIR)",
        )
    return data, {"kind": "paper", "repo": src.repo, "commit": src.commit, "path": src.path, "sha256": src.sha256}


def prepare_file(root: Path, rel: str) -> Path:
    """Make ``root/rel`` present from its catalogued source; returns its path."""
    from pktransfer.fileio import atomic_write, write_json

    path = root / rel
    if path.is_file():
        return path
    src = CATALOG.get(rel)
    if src is None:
        raise DataError(
            f"data file '{rel}' is local only: pktransfer knows no public source for it",
            hint="set PKT_DATA_DIR (or task.data_dir) to a folder that holds it",
        )
    if isinstance(src, HubSource):
        rows, record = _fetch_hub(src)
        _write_jsonl(path, rows)
    else:
        data, record = _fetch_url(src)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    write_json(_source_record(path), record)
    return path


def source_of(rel: str) -> str:
    src = CATALOG.get(rel)
    return src.describe() if src is not None else "local only"


@dataclass
class FileStatus:
    split: str
    file: str
    source: str
    present: bool
    where: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_files(task: Any) -> list[tuple[str, str]]:
    """(split, file) for every file a task can read (its splits, plus few-shot exemplars)."""
    out: list[tuple[str, str]] = []
    for split in task.splits:
        for rel in task.data_files(split):
            if (split, rel) not in out:
                out.append((split, rel))
    for rel in getattr(task, "EXTRA_FILES", ()):
        out.append(("(exemplars)", rel))
    return out


def status(task: Any) -> list[FileStatus]:
    """Each file of ``task``: its public source and whether it is present in the data folder in use."""
    root = task.data_dir()
    where = "cache" if root == data_cache() else "local"
    return [
        FileStatus(split, rel, source_of(rel), (root / rel).is_file(), f"{where}: {root / rel}")
        for split, rel in task_files(task)
    ]


def fetch(task: Any) -> list[Path]:
    """Prepare every file of ``task`` in the data folder in use (only the cache is ever written)."""
    root = task.data_dir()
    paths = []
    for _split, rel in task_files(task):
        if (root / rel).is_file():
            paths.append(root / rel)
        elif root != data_cache():
            raise DataError(
                f"'{root / rel}' is missing in the configured data folder {root}",
                hint="complete that folder, or unset PKT_DATA_DIR / task.data_dir so that pktransfer fetches into its cache",
            )
        else:
            paths.append(prepare_file(root, rel))
    return paths
