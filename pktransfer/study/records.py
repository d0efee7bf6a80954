"""What a finished cell leaves and how it comes back: a cell's record for the report (``cell_record``), and the
records folder that carries a long study across machines without its weights (save, restore, relocate, reruns, and
the package versions its cells ran with).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pktransfer.fileio import write_text
from pktransfer.progress import Progress
from pktransfer.recipe import BUDGET_KEYS
from pktransfer.study.plan import Cell, TuneCell

SPENT_KEYS = (
    "trainable_parameters",
    "optimizer_steps",
    "training_tokens",
    "student_generated_tokens",
    "student_generation_seconds",
    "on_policy_batches",
)


# what "equal budget" compares; the rest of SPENT_KEYS is extra student compute (on-policy sampling), shown as cost
EQUAL_BUDGET_KEYS = SPENT_KEYS[:3]


def cell_record(cell: Cell) -> dict[str, Any]:
    run = json.loads((cell.folder / "run.json").read_text())
    history_path = cell.folder / "checkpoints" / "log_history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    stages = run.get("stages", {})
    earlier = resumed_cost(run)
    before = earlier["train_seconds"] if earlier.get("cost_kept") else 0.0
    record = {
        "label": cell.label,
        "seed": cell.seed,
        "method": run["recipe"]["method"]["name"],
        "folder": str(cell.folder),
        "metrics": {split: m["accuracy"] for split, m in run["metrics"].get("trained", {}).items()},
        "items": {split: item_scores(cell.folder, run, split) for split in run["metrics"].get("trained", {})},
        "n_eval": {split: m["n"] for split, m in run["metrics"].get("trained", {}).items()},
        "steps": run["training"]["steps"],
        "final_loss": run["training"]["final_loss"],
        # a resumed cell: its last attempt plus the earlier attempts' training up to the checkpoint (the ledger);
        # a method that trains inside its preparation (LaTen) has no train stage
        "prepare_seconds": stages.get("prepare", {}).get("seconds", 0.0) + (0.0 if "train" in stages else before),
        "train_seconds": stages.get("train", {}).get("seconds", 0.0) + (before if "train" in stages else 0.0),
        "wall_seconds": run["wall_seconds"] + before,
        "resumed": earlier or None,
        "cost_partial": None
        if not earlier or earlier.get("cost_kept")
        else f"resumed at step {earlier['step']} of {run['training']['steps']} before pktransfer kept a cost ledger: its "
        "time and teacher work count the last attempt only",
        "peak_rss_anon_gib": max((s.get("peak_rss_anon_gib", 0.0) for s in stages.values()), default=0.0),
        "peak_cuda_gib": max((s.get("peak_cuda_gib", 0.0) for s in stages.values()), default=0.0),
        "loss_curve": [(h["step"], h["loss"]) for h in history if "loss" in h]
        # fewer steps than training.logging_steps: only the trainer's closing mean loss exists
        or [(h["step"], h["train_loss"]) for h in history if "train_loss" in h],
        "budget": {k: run["recipe"][k.split(".")[0]][k.split(".")[1]] for k in BUDGET_KEYS},
        "spent": {k: run.get("budget", {}).get(k) for k in SPENT_KEYS},
        "teacher": run.get("budget", {}).get("teacher", {}),
        "learning_curve": run["training"].get("learning_curve", []),
    }
    # multiple choice: how often the trained student predicts each letter (absent for other tasks, so the records
    # and reports of generation grids stay as they were)
    predicted = {split: m["predicted"] for split, m in run["metrics"].get("trained", {}).items() if m.get("predicted")}
    if predicted:
        record["predicted"] = predicted
    return record


def tuning_row(tc: TuneCell, cell: Cell) -> dict[str, Any]:
    """A finished tuning cell's line of the report (``cell``: where it lies, the grid's folder or a record)."""
    rec = cell_record(cell)
    return {
        "label": tc.label,
        "key": tc.key,
        "index": tc.index,
        "value": tc.value,
        "validation": rec["metrics"]["validation"],
        "n_validation": rec["n_eval"]["validation"],
        "seed": tc.cell.seed,
        "final_loss": rec["final_loss"],
        "wall_seconds": rec["wall_seconds"],
        "teacher": rec["teacher"],
        "resumed": rec["resumed"],
        "cost_partial": rec["cost_partial"],
    }


def resumed_cost(run: dict[str, Any]) -> dict[str, Any]:
    """A run.json's ``training.earlier_attempts`` (empty for a run trained in one go). Runs resumed before the ledger
    existed recorded only ``resumed_from``: their checkpoint's step is read from its name, ``cost_kept`` False."""
    training = run.get("training", {})
    if training.get("earlier_attempts"):
        return training["earlier_attempts"]
    resumed = training.get("resumed_from")
    if not resumed:
        return {}
    step = Path(resumed).name.rsplit("-", 1)[-1]
    return {"step": int(step) if step.isdigit() else step, "cost_kept": False}


def item_scores(folder: Path, run: dict[str, Any], split: str) -> dict[str, float]:
    """Item id -> 1.0 / 0.0 (correct) of the trained model's evaluation on ``split`` (for the paired bootstrap)."""
    task = run["recipe"]["task"]["name"]
    path = folder / "eval" / f"trained.{task}.{split}.items.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["id"]): float(bool(r["correct"])) for r in rows}


# what a finished folder's result is (its weights, checkpoints and caches are not: they can be rebuilt)
# (seeking.json: which teacher submatrix a Seeking cell chose; absent for other methods)
RECORD_FILES = ("run.json", "recipe.yaml", "report.md", "checkpoints/log_history.json", "seeking.json")


ORIGIN = "record.json"  # in each record: the grid folder it was made in (paths into it are relocated on restore)


def _relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path inside folder ``old`` moved to the same place inside ``new``."""
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value


def relocate_record(folder: Path, old: str, new: str) -> None:
    """A record made in grid folder ``old``, restored into ``new``: the paths its recipe holds into the old grid
    (shared caches: KD's logits, SemAlign's targets, Seeking's sensitivity) are moved to the new grid, so the
    grid's recipe check sees the recipe it would write there; the marker's hash is that of the moved recipe."""
    import yaml

    from pktransfer.fileio import write_json
    from pktransfer.runs import MARKER, recipe_sha256

    marker = json.loads((folder / MARKER).read_text())
    if marker.get("recipe") is not None:
        marker["recipe"] = _relocate(marker["recipe"], old, new)
        marker["recipe_sha256"] = recipe_sha256(marker["recipe"])
        write_json(folder / MARKER, marker)
    if (folder / "run.json").is_file():
        write_json(folder / "run.json", _relocate(json.loads((folder / "run.json").read_text()), old, new))
    if (folder / "recipe.yaml").is_file():
        moved = _relocate(yaml.safe_load((folder / "recipe.yaml").read_text()), old, new)
        write_text(folder / "recipe.yaml", yaml.safe_dump(moved, sort_keys=False, allow_unicode=True))


REPORT_FILES = (
    "compare.md",
    "compare.csv",
    "compare.json",
    "compare_scores.png",
    "compare_loss.png",
    "constraints.txt",
    "budget.json",
)


# packages whose versions change what a cell computes (run.json's ``versions``), pinned in a grid's constraints.txt
PINNED = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "scipy", "gguf")


def grid_constraints(runs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """A pip constraints file pinning the versions the grid's cells ran with (from each run.json), and the packages
    whose versions differ between cells (then the most common version is pinned and the file says so)."""
    from collections import Counter

    lines = [
        "# the package versions this comparison's cells ran with (written by pkt compare from each run.json);",
        "# reproduce with: pip install -c constraints.txt -c THIS_FILE '.[offline]'   (torch: the CPU build, +cpu)",
    ]
    mixed = []
    for pkg in PINNED:
        seen = Counter(r.get("versions", {}).get(pkg) for r in runs)
        seen.pop(None, None)
        seen.pop("not installed", None)
        if not seen:
            continue
        version, _ = seen.most_common(1)[0]
        if len(seen) > 1:
            mixed.append(f"{pkg}: " + ", ".join(f"{v} ({n} cells)" for v, n in seen.most_common()))
            lines.append(f"# {pkg}: cells ran with {', '.join(seen)}; the most common is pinned")
        lines.append(f"{pkg}=={version.split('+', 1)[0]}")
    return "\n".join(lines) + "\n", mixed


RERUNS = "reruns.json"  # in a record: the earlier finished results of the same folder it replaced


def rerun_history(dest: Path) -> list[dict[str, Any]]:
    """The earlier finished results recorded at ``dest`` (empty when nothing was recorded there): what a record
    replacing it must keep, so a report can say an entry was rerun after its results existed."""
    if not (dest / "run.json").is_file():
        return []
    old = json.loads((dest / "run.json").read_text())
    earlier = json.loads((dest / RERUNS).read_text()) if (dest / RERUNS).is_file() else []
    return [
        *earlier,
        {
            "started_at": old.get("started_at"),
            "wall_seconds": old.get("wall_seconds"),
            "metrics": {split: m.get("accuracy") for split, m in old.get("metrics", {}).get("trained", {}).items()},
        },
    ]


def same_run(recorded: Path, current: Path) -> bool:
    """Whether two run.json files are one run: byte for byte, or the same start and wall time (a record restored
    into another grid folder has its paths moved, ``relocate_record``, and is not a rerun)."""
    if recorded.read_bytes() == current.read_bytes():
        return True
    a, b = json.loads(recorded.read_text()), json.loads(current.read_text())
    return a.get("started_at") is not None and (a.get("started_at"), a.get("wall_seconds")) == (
        b.get("started_at"),
        b.get("wall_seconds"),
    )


def save_record(folder: Path, root: Path, records: Path) -> None:
    """Copy a finished folder's record (marker, run.json, recipe, per-item evaluations, loss history) to the
    same place under ``records``; written to a temporary folder, then renamed into place."""
    import tempfile

    from pktransfer.fileio import honour_umask, write_json
    from pktransfer.runs import MARKER

    dest = records / folder.relative_to(root)
    if (dest / "run.json").is_file() and same_run(dest / "run.json", folder / "run.json"):
        return  # already recorded (or restored from this record, perhaps into another grid folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: two workers may record the same finished folder at once
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    for rel in (MARKER, *RECORD_FILES, *(str(f.relative_to(folder)) for f in sorted((folder / "eval").glob("*")))):
        if (folder / rel).is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, tmp / rel)
    write_json(tmp / ORIGIN, {"grid": str(root)})
    history = rerun_history(dest)
    if history:  # this folder was run again after a finished result had been recorded: the record keeps saying so
        write_json(tmp / RERUNS, history)
    honour_umask(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:  # another worker recorded it in between: the same finished folder, so the same record
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "run.json").is_file():
            raise


def recorded_reruns(records_dir: Path | None, root: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """Cells whose record replaced an earlier finished result: label, seed, folder and the earlier results."""
    if records_dir is None:
        return []
    out = []
    for c in cells:
        rel = c.folder.resolve().relative_to(root)
        if (records_dir / rel / RERUNS).is_file():
            earlier = json.loads((records_dir / rel / RERUNS).read_text())
            out.append({"label": c.label, "seed": c.seed, "folder": str(rel), "earlier": earlier})
    return out


def restore_records(records: Path, root: Path, progress: Progress) -> int:
    """Put every finished record under ``records`` back into the grid where that folder is missing, relocated
    from the grid folder it was made in (``relocate_record``); the grid's usual check then refuses any record
    made with another recipe. Shared work is not restored (its record holds its cost, not its caches). Returns
    how many were restored."""
    import tempfile

    from pktransfer.fileio import honour_umask
    from pktransfer.runs import MARKER

    n = 0
    for run in sorted(records.glob("**/run.json")):
        src = run.parent
        if src == records or not (src / MARKER).is_file() or src.name.endswith(".partial"):
            continue
        if src.relative_to(records).parts[0] == "shared":
            continue
        dest = root / src.relative_to(records)
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".restoring", dir=dest.parent))
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        origin = json.loads((src / ORIGIN).read_text())["grid"] if (src / ORIGIN).is_file() else str(root)
        if origin != str(root):
            relocate_record(tmp, origin, str(root))
        honour_umask(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another worker restored it in between
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        n += 1
    if n:
        progress.log(f"compare: restored {n} finished folders from the records in {records}")
    return n
