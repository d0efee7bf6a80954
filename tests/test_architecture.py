"""The package's shape: a method is one file + one registry line; generic layers name no method; no import cycles."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from typer.testing import CliRunner

import pktransfer
from pktransfer.cli import app
from pktransfer.config import MethodConfig
from pktransfer.methods import registry
from pktransfer.methods.base import Method, MethodContext, SharedWork
from pktransfer.recipe import recipe_from_dict

PKG = Path(pktransfer.__file__).parent


class ToyConfig(MethodConfig):
    name: Literal["toy"] = "toy"
    note: str = "hello"


class ToyMethod(Method):
    """Plain LoRA that records its note and asks a comparison to share a (pretend) folder."""

    config_class = ToyConfig

    def prepare(self, ctx: MethodContext) -> Any:
        from peft import get_peft_model

        from pktransfer.training import lora_config

        return get_peft_model(ctx.student.model, lora_config(ctx.recipe.lora, ctx.student.arch))

    def report(self) -> dict[str, Any]:
        return {"note": self.spec.note}

    @classmethod
    def shared_work(cls, recipe: Any, shared_root: Path) -> SharedWork:
        return SharedWork(recipe.model_copy(update={"method": recipe.method.model_copy(update={"note": "shared"})}))

    @classmethod
    def report_notes(cls, labels: list[str]) -> list[str]:
        return [f"TOY NOTE for {labels}", ""]


@pytest.fixture
def toy():
    registry.register(ToyMethod)
    yield ToyMethod
    registry.unregister("toy")


def test_a_registered_method_runs_through_pkt_run_and_pkt_compare(toy, tiny_recipe, tmp_path):
    tiny_recipe["method"] = {"name": "toy", "note": "from the recipe"}
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    run = json.loads((Path(tiny_recipe["output_dir"]) / "run.json").read_text())
    assert run["method"] == {"note": "from the recipe"} and run["recipe"]["method"]["name"] == "toy"
    grid = {**tiny_recipe, "output_dir": str(tmp_path / "grid"), "compare": {"methods": ["lora", {"name": "toy"}], "seeds": [0]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "g.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "grid" / "compare.md").read_text()
    assert "TOY NOTE for ['toy']" in md and "| toy |" in md
    cell = json.loads((tmp_path / "grid" / "cells" / "toy" / "seed-0" / "run.json").read_text())
    assert cell["method"] == {"note": "shared"}  # the method's shared_work hook was used


def test_the_registry_refuses_a_duplicate_name_and_unknown_methods_are_recipe_errors(toy):
    with pytest.raises(ValueError, match="already registered"):
        registry.register(ToyMethod)
    registry.unregister("toy")
    with pytest.raises(pktransfer.PktError, match="toy"):
        recipe_from_dict({"method": {"name": "toy"}})
    registry.register(ToyMethod)


def test_generic_layers_name_no_method():
    names = set(registry.names())
    study = [f"study/{p.stem}" for p in sorted((PKG / "study").glob("*.py"))]
    for module in ("pipeline", *study, "reports", "training", "cli"):
        tree = ast.parse((PKG / f"{module}.py").read_text())
        code_strings = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and not n.value.startswith(("add compare", "\n"))
        ]
        docstrings = {ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))}
        for s in code_strings:
            if s in docstrings or " " in s:  # prose (help texts, hints) may mention methods by name
                continue
            assert s not in names - {"lora", "pissa"} or module == "training", (module, s)
        idents = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
        }
        assert not {i for i in idents if i.endswith("Method") and i != "Method"}, module


def _imports(path: Path, module: str, typing_too: bool = False) -> set[str]:
    """pktransfer modules imported by ``path`` (function-level imports too; TYPE_CHECKING blocks only with
    ``typing_too``)."""
    tree = ast.parse(path.read_text())
    skip = (
        set()
        if typing_too
        else {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
    )
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join([*module.split(".")[: -node.level], node.module])
            if base.startswith("pktransfer"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pktransfer"))
    return out


def test_no_import_cycles_between_modules():
    """Type-only imports count too: the recipe and the methods both sit above config (sections and the config
    registry), so neither reaches back to the other even for a type."""
    modules = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = f
    graph = {m: {i for i in _imports(f, m, typing_too=True) if i in modules and i != m} for m, f in modules.items()}
    # a package's __init__ that only re-exports its own submodules is not a dependency of those submodules
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if n == "pktransfer" or (m.startswith(n + ".")):
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n) :], n]))
            if not state.get(n):
                visit(n, [*stack, n])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [m])


def test_a_method_module_imports_no_other_method_and_ops_only_math():
    """Shared steps live in methods/{base,injection,teacher_cache,registry}.py, not in another method's file;
    ops/ is pure math (no file I/O, no methods)."""
    shared = {"base", "injection", "teacher_cache", "registry", "__init__"}
    method_files = [f for f in (PKG / "methods").glob("*.py") if f.stem not in shared]
    assert len(method_files) >= 6
    for f in method_files:
        others = {f"pktransfer.methods.{g.stem}" for g in method_files if g != f}
        assert not _imports(f, f"pktransfer.methods.{f.stem}") & others, f.stem
    for f in (PKG / "ops").glob("*.py"):
        deps = _imports(f, f"pktransfer.ops.{f.stem}")
        assert all(d.startswith("pktransfer.ops") for d in deps), (f.stem, deps)


STUDY_LAYERS = ("plan", "schedule", "budget", "records", "analysis", "grid", "interim", "workers")


def test_the_study_package_reads_in_small_rooms_that_import_only_downward():
    """pktransfer/study/: each module one concern, at most 500 lines, no function over 60 lines, and each imports only
    the modules before it in ``STUDY_LAYERS`` (no cycles, a reader can stop at any layer)."""
    folder = PKG / "study"
    assert {p.stem for p in folder.glob("*.py")} == {*STUDY_LAYERS, "__init__"}
    for i, name in enumerate(STUDY_LAYERS):
        src = (folder / f"{name}.py").read_text()
        tree = ast.parse(src)
        assert len(src.splitlines()) <= 500, name
        for f in ast.walk(tree):
            if isinstance(f, ast.FunctionDef):
                assert f.end_lineno - f.lineno + 1 <= 60, (name, f.name)
        imported = {
            n.module.rsplit(".", 1)[-1]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("pktransfer.study.")
        }
        assert imported <= set(STUDY_LAYERS[:i]), (name, imported - set(STUDY_LAYERS[:i]))
