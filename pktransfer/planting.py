"""``pkt plant``: give the teacher facts that only its weights will hold.

For a task with a ``plant`` split (the planted-facts task: every fact, training templates only) this

1. scores the untouched teacher and student on the recall splits (held-out templates) and refuses if either is
   above chance on any of them (one-sided exact binomial test, Bonferroni over models x splits): the facts must be
   new to both;
2. fine-tunes the teacher with LoRA on the ``plant`` split (``plant.lora``, ``plant.training``);
3. scores the planted teacher on the same splits, and refuses, naming the recall it reached, when its recall on the
   ``test`` split is under ``plant.min_recall`` (raise the planting budget then);
4. keeps both the adapter (``adapter/``, the teacher's delta: a PEFT folder on the untouched teacher) and the merged
   planted teacher (``merged/``, loadable with ``from_pretrained``; merged in float64, ``training.merge_lora_exact``,
   so the same adapter gives the same merged weights on any CPU), with ``run.json`` and ``report.md``.

A study then names ``merged/`` as its teacher; a method that moves a teacher's fine-tuning delta can read
``adapter/``. A refused planting leaves its evaluations in ``OUTPUT.partial`` with ``FAILED.json``, never a
finished folder.

``from_adapter`` (``pkt plant --from-adapter DIR``) skips step 2: the adapter of an earlier planting (e.g. one a study
committed) is copied byte for byte into ``adapter/`` and merged, and steps 1, 3 and 4 run as above. Planting in bf16
is not reproducible across CPUs (their bf16 arithmetic differs), so this, not planting again, is how another machine
gets the same teacher: ``run.json`` records the adapter's sha256 and the merged weights' sha256.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pktransfer.data import encode_items, get_task
from pktransfer.errors import PktError, RecipeError
from pktransfer.evaluation import EvalResult, evaluate_items
from pktransfer.models import load_config, load_model
from pktransfer.models.loading import adapter_sha256, weights_sha256
from pktransfer.pipeline import (
    RunResult,
    _eval_items,
    eval_options,
    formatter_for,
    model_identity,
    run_folder,
    run_info,
    seed_everything,
)
from pktransfer.progress import Progress
from pktransfer.recipe import PlantSpec, Recipe
from pktransfer.runs import StageLog


def above_chance(correct: int, n: int, chance: float) -> float:
    """One-sided exact binomial p-value of ``correct`` of ``n`` (or more) under accuracy ``chance``."""
    from scipy.stats import binomtest

    return float(binomtest(correct, n, chance, alternative="greater").pvalue)


def chance_check(metrics: dict[str, dict[str, dict[str, Any]]], chance: float, alpha: float) -> list[dict[str, Any]]:
    """One row per (model, split): accuracy, chance, the binomial p and whether it is above chance after Bonferroni."""
    rows = [
        {"model": label, "split": split, "n": m["n"], "correct": m["correct"], "accuracy": m["accuracy"], "chance": chance}
        for label, by_split in metrics.items()
        for split, m in by_split.items()
    ]
    for r in rows:
        r["p_above_chance"] = above_chance(r["correct"], r["n"], chance)
        r["above_chance"] = r["p_above_chance"] < alpha / len(rows)
    return rows


def check_plantable(recipe: Recipe) -> tuple[Any, PlantSpec]:
    """Everything `pkt plant` can check before loading weights: the task has facts to plant, the splits exist."""
    task = get_task(recipe.task.name, recipe.task.params, recipe.task.data_dir)
    if "plant" not in task.splits:
        raise RecipeError(
            f"task '{task.name}' has no facts to plant (no 'plant' split)",
            hint="set task.name: planted (the planted-facts task) in the recipe",
        )
    spec = recipe.plant or PlantSpec()
    for split in spec.splits:
        _eval_items(task, split, recipe)
    base = spec.base or recipe.teacher
    load_config(base.model, base.revision)
    load_config(recipe.student.model, recipe.student.revision)
    return task, spec


def plant(
    recipe: Recipe,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    from_adapter: str | Path | None = None,
) -> RunResult:
    """Plant the task's facts in the recipe's teacher (see the module docstring); returns the folder and run.json.
    ``from_adapter``: an earlier planting's adapter folder, merged instead of training one."""
    import shutil

    from peft import PeftModel, get_peft_model

    from pktransfer.training import check_targets, lora_config, merge_lora_exact, train

    progress = progress or Progress(quiet=quiet)
    task, spec = check_plantable(recipe)
    chance = float(task.protocol()["chance"])
    base = spec.base or recipe.teacher
    out_recipe = recipe.model_copy(update={"output_dir": spec.output_dir, "teacher": base})
    started = time.time()
    planting: dict[str, Any] = {"planting": spec.result_fields()}
    given = Path(from_adapter).expanduser() if from_adapter is not None else None
    if given is not None:
        if not (given / "adapter_config.json").is_file():
            raise RecipeError(
                f"--from-adapter '{given}' has no adapter_config.json",
                hint="pass the adapter/ folder of a finished planting",
            )
        sha = adapter_sha256(given)
        if sha is None:
            raise RecipeError(
                f"--from-adapter '{given}' has no adapter_model.safetensors (or .bin)",
                hint="pass the adapter/ folder of a finished planting (it holds adapter_config.json and the weights)",
            )
        planting["from_adapter_sha256"] = sha  # another adapter: another folder identity
    # what a planting's results depend on: the teacher, the student (its chance check), the facts and the planting
    only = ("teacher", "student", "task", "seed")
    with run_folder(out_recipe, overwrite, progress, planting, kind="plant", only=only) as (rd, log):
        metrics: dict[str, dict[str, dict[str, Any]]] = {}

        def score(label: str, model: Any, loaded: Any, stage: StageLog) -> None:
            formatter = formatter_for(loaded, task, recipe)
            metrics[label] = {}
            with stage.stage(f"eval_{label}"):
                for split in spec.splits:
                    done = EvalResult.finished(rd.path("eval"), label, task.name, split)
                    if done is not None:  # a resumed planting: this evaluation already finished
                        metrics[label][split] = {k: done[k] for k in ("n", "correct", "accuracy", "metrics")}
                        progress.log(f"{label} on {split}: reusing finished evaluation ({100 * done['accuracy']:.1f}%)")
                        continue
                    res = evaluate_items(
                        model,
                        formatter,
                        _eval_items(task, split, recipe),
                        label=label,
                        task=task,
                        split=split,
                        options=eval_options(recipe, task),
                        progress=progress,
                    )
                    res.save(rd.path("eval"))
                    metrics[label][split] = {k: res.summary[k] for k in ("n", "correct", "accuracy", "metrics")}
                    progress.log(f"{label} on {split}: {100 * res.accuracy:.1f}% (chance {100 * chance:.1f}%)")

        with log.stage("load_student"):
            student = load_model(recipe.student, log=progress.log)
        score("student", student.model, student, log)
        student.unload()
        with log.stage("load_teacher"):
            teacher = load_model(base, log=progress.log)
        score("teacher", teacher.model, teacher, log)
        untouched = chance_check(metrics, chance, spec.chance_alpha)
        known = [r for r in untouched if r["above_chance"]]
        if known:
            r = known[0]
            raise PktError(
                f"the untouched {r['model']} is above chance on '{r['split']}' ({100 * r['accuracy']:.1f}% against "
                f"{100 * chance:.1f}%, p = {r['p_above_chance']:.2g}): the facts are not new to it",
                hint="draw another fact table (task.params.data_seed) and plant again",
            )
        formatter = formatter_for(teacher, task, recipe)
        items = task.split("plant")
        examples = encode_items(formatter, items, spec.training.max_length, f"task '{task.name}' plant split")
        if len(examples) < len(items):
            raise RecipeError(
                f"plant.training.max_length {spec.training.max_length} cuts {len(items) - len(examples)} of the "
                f"{len(items)} planting items to no answer",
                hint="raise plant.training.max_length",
            )
        seed_everything(recipe.seed)
        if given is not None:
            with log.stage("plant"):
                try:
                    model = PeftModel.from_pretrained(teacher.model, str(given))
                except (OSError, ValueError, RuntimeError, KeyError) as err:
                    raise RecipeError(
                        f"--from-adapter '{given}' does not fit the teacher '{base.model}': {str(err).splitlines()[0][:200]}",
                        hint="pass an adapter planted on this teacher (plant.base, else the recipe's teacher)",
                    ) from None
                shutil.copytree(given, rd.path("adapter"), dirs_exist_ok=True)  # byte for byte: its sha256 stays
            planted = {"from_adapter": str(given), "adapter_sha256": planting["from_adapter_sha256"]}
        else:
            check_targets(teacher.model, spec.lora, teacher.arch, progress.warn)
            model = get_peft_model(teacher.model, lora_config(spec.lora, teacher.arch))
            with log.stage("plant"):
                result = train(
                    model,
                    teacher.tokenizer,
                    examples,
                    spec.training,
                    output_dir=rd.path("checkpoints"),
                    seed=recipe.seed,
                    progress=progress,
                )
            model.save_pretrained(str(rd.path("adapter")))
            teacher.tokenizer.save_pretrained(str(rd.path("adapter")))
            planted = {
                "steps": result.steps,
                "training_tokens": result.tokens_seen,
                "seconds": round(result.seconds, 1),
                "final_loss": result.final_loss,
                "trainable_parameters": result.trainable_parameters,
                "adapter_sha256": adapter_sha256(rd.path("adapter")),
            }
        merged = merge_lora_exact(model)  # the same merged weights on every CPU
        merged.eval()
        score("planted", merged, teacher, log)
        recall = metrics["planted"]["test"]["accuracy"] if "test" in metrics["planted"] else None
        info = run_info(
            out_recipe,
            log,
            started,
            verb="plant",
            task=task.describe(),
            prompt_format=formatter.describe(),
            plant={
                "items": len(items),
                "facts": task.describe().get("facts"),
                **planted,
                "min_recall": spec.min_recall,
                "recall_test": recall,
            },
            untouched_at_chance=untouched,
            metrics=metrics,
            models={"student": model_identity(student), "teacher": model_identity(teacher)},
            outputs={"adapter": "adapter", "merged": "merged", "eval": "eval"}
            | ({} if given is not None else {"checkpoints": "checkpoints"}),
        )
        rd.write_json("run.json", info)
        if recall is not None and recall < spec.min_recall:
            raise PktError(
                f"the planted teacher recalls {100 * recall:.1f}% of the test facts on held-out templates, under "
                f"plant.min_recall {100 * spec.min_recall:.0f}% (a_test / validation: "
                + ", ".join(f"{100 * m['accuracy']:.1f}%" for s, m in metrics["planted"].items() if s != "test")
                + ")",
                hint="raise the planting budget (plant.training.epochs or plant.training.lr) and plant again with "
                "--overwrite (this attempt stays in OUTPUT.partial until then)",
            )
        with log.stage("save_merged"):
            merged.save_pretrained(str(rd.path("merged")), safe_serialization=True)
            teacher.tokenizer.save_pretrained(str(rd.path("merged")))
            info["models"]["planted"] = {"model": "merged", "weights_sha256": weights_sha256(rd.path("merged"))}
        info["stages"] = log.stages
        rd.write_json("run.json", info)
        from pktransfer.fileio import write_text

        write_text(rd.path("report.md"), plant_report(info))
    return RunResult(rd.finish(), info)


def plant_report(info: dict[str, Any]) -> str:
    """report.md of a planting: recall per model and split against chance, and what the planting cost."""
    p = info["plant"]
    lines = [
        "# Planted teacher",
        "",
        f"Task `{info['task']['name']}` (data_seed {info['task'].get('data_seed')}): facts {p['facts']}; "
        f"{p['items']} planting items (training templates).",
        f"Planting: {p['steps']} steps, {p['training_tokens']} tokens, {p['seconds']} s, final loss {p['final_loss']:.4f}."
        if "steps" in p
        else f"Planting: the adapter of an earlier planting ({p['from_adapter']}, sha256 {p['adapter_sha256'][:12]}), merged.",
        "",
        "Recall on held-out templates (accuracy by log-likelihood ranking of the attribute's candidates):",
        "",
        "| model | " + " | ".join(next(iter(info["metrics"].values()))) + " |",
        "|---|" + "---:|" * len(next(iter(info["metrics"].values()))),
    ]
    for label, by_split in info["metrics"].items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * m['accuracy']:.1f}%" for m in by_split.values()) + " |")
    lines += ["", "Untouched models against chance (one-sided exact binomial, Bonferroni):", ""]
    for r in info["untouched_at_chance"]:
        verdict = "above chance" if r["above_chance"] else "at chance"
        lines.append(
            f"- {r['model']} / {r['split']}: {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f}% "
            f"(chance {100 * r['chance']:.1f}%, p = {r['p_above_chance']:.3g}): {verdict}"
        )
    return "\n".join(lines) + "\n"
