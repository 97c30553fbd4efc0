"""Imports flow one way: cli -> engine -> {model, data, metrics}. model and data never import each other, and
the model layer touches no IO library (PIL, pyarrow, webdataset, typer) and no torch.distributed code of ours."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

MODEL_MODULES = [
    "ramtag.model.ram",
    "ramtag.model.checkpoint",
    "ramtag.model.kcot",
    "ramtag.model.backbone",
    "ramtag.metrics",
]
DATA_MODULES = [
    "ramtag.data.sources",
    "ramtag.data.labelled_samples",
    "ramtag.data.parts",
    "ramtag.data.assemble",
    "ramtag.data.vocab",
    "ramtag.data.annotations",
    "ramtag.data.synth",
    "ramtag.data.synth_files",
    "ramtag.data.augment",
]


# One interpreter imports torch (which every layer may use, and which loads none of the names forbidden below),
# then forks a child per module that imports it and reports sys.modules: a fresh interpreter per module cost
# ~2 s of torch import each.
_FORKED_IMPORTS = """
import json, os, sys
import torch
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        __import__(module)
        print(json.dumps([module, sorted(sys.modules)]), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        sys.exit(f"importing {module} failed")
"""


@pytest.fixture(scope="module")
def loaded_after_import() -> dict[str, set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _FORKED_IMPORTS, *MODEL_MODULES, *DATA_MODULES],
        capture_output=True, text=True, check=True, timeout=300,
    )
    return {module: set(names) for module, names in map(json.loads, result.stdout.splitlines())}


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(result.stdout.split())


def test_a_forked_import_sees_all_that_a_fresh_interpreter_loads(loaded_after_import):
    # torch loaded first can only add names, and none that the layer tests forbid: nothing is hidden
    assert _loaded_after_import("ramtag.data.sources") <= loaded_after_import["ramtag.data.sources"]


@pytest.mark.parametrize("module", MODEL_MODULES)
def test_model_layer_knows_nothing_of_io_engine_or_cli(module, loaded_after_import):
    loaded = loaded_after_import[module]
    forbidden = {"ramtag.data", "ramtag.engine", "ramtag.cli", "PIL", "pyarrow", "webdataset", "typer"}
    assert not {
        name for name in loaded if name.split(".")[0] in forbidden or ".".join(name.split(".")[:2]) in forbidden
    }


@pytest.mark.parametrize("module", DATA_MODULES)
def test_data_layer_never_imports_the_model(module, loaded_after_import):
    loaded = loaded_after_import[module]
    assert not {name for name in loaded if name.startswith(("ramtag.model", "ramtag.engine", "ramtag.cli"))}


# -- the same rules read from the source: every import statement, at any depth (function-local ones too) --------

PACKAGE = Path(__file__).resolve().parent.parent / "ramtag"

KNOWN_IMPORT_CYCLES: list[set[str]] = []
"""Import circles that exist and are being removed elsewhere. One that no longer exists fails the test, so that
the list only ever shrinks."""

FORBIDDEN = {
    "ramtag.model": ("ramtag.engine", "ramtag.cli", "ramtag.data"),
    "ramtag.data": ("ramtag.engine", "ramtag.cli", "ramtag.model"),
    "ramtag.metrics": ("ramtag.engine", "ramtag.cli", "ramtag.data", "ramtag.model"),
    "ramtag.engine": ("ramtag.cli",),
}
"""Layer -> what no module in it may import: cli -> engine -> {model, data, metrics}."""

MODEL_FORBIDDEN_LIBRARIES = ("PIL", "pyarrow", "webdataset", "typer")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports anywhere in its file, as absolute names; ``from pkg import mod`` counts as
    importing ``pkg.mod`` when that is a module of ours."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {target})
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports. Importing an enclosing package (``from ramtag import
    __version__``) is left out: Python has run every enclosing package before the module itself."""
    modules = _modules()
    known = set(modules)
    return {
        name: {target for target in _imports(name, path, known) if target in known and not _in(name, target)}
        for name, path in modules.items()
    }


def _in(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def test_no_module_imports_across_the_layers_even_inside_a_function():
    graph = _graph()
    assert len(graph) > 40 and any(name.startswith("ramtag.engine.") for name in graph)
    broken = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for layer, forbidden in FORBIDDEN.items()
        if _in(module, layer)
        for target in targets
        if any(_in(target, other) for other in forbidden)
    )
    broken += sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if _in(module, "ramtag.model")
        for target in targets
        if target.split(".")[0] in MODEL_FORBIDDEN_LIBRARIES
    )
    assert not broken, "\n".join(broken)


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan), plus modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


EVAL_IMPORTS = {
    "types": set(),
    "protocol": {"types"},
    "calibrate": {"types", "protocol"},
    "model": {"types", "protocol", "calibrate"},
    "table": {"types", "protocol", "calibrate"},
    "render": {"types"},
    "plots": {"types", "render"},
    "run": {"types", "calibrate", "model", "table", "render", "plots"},
}
"""Module of ramtag.engine.eval -> the modules of the package it may import: the types import nothing of it, and
rendering (render, plots) never imports a scoring loop."""


def test_the_evaluation_package_imports_one_way():
    graph = _graph()
    package = "ramtag.engine.eval"
    found = {name.removeprefix(package + ".") for name in graph if name.startswith(package + ".")}
    assert found == set(EVAL_IMPORTS), "add the new module of ramtag.engine.eval to EVAL_IMPORTS"
    assert not graph[package], "ramtag.engine.eval's __init__ imports nothing"
    broken = sorted(
        f"{package}.{module} imports {target}"
        for module, allowed in EVAL_IMPORTS.items()
        for target in graph[f"{package}.{module}"]
        if target.startswith(package + ".") and target.removeprefix(package + ".") not in allowed
    )
    assert not broken, "\n".join(broken)


def test_no_import_circles_in_the_package():
    cycles = _cycles(_graph())
    unexpected = [sorted(cycle) for cycle in cycles if cycle not in KNOWN_IMPORT_CYCLES]
    assert not unexpected, f"import circles: {unexpected}"
    gone = [sorted(cycle) for cycle in KNOWN_IMPORT_CYCLES if cycle not in cycles]
    assert not gone, f"no longer circles, remove them from KNOWN_IMPORT_CYCLES: {gone}"


def test_the_cycle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_progress_is_drawn_in_one_place():
    """tag, train and eval show progress through ramtag.engine.reporter; there were three bars, each its own."""
    modules = _modules()
    known = set(modules)
    drawing = sorted(
        name
        for name, path in modules.items()
        if any(_in(target, "rich.progress") or _in(target, "rich.live") for target in _imports(name, path, known))
    )
    assert drawing == ["ramtag.engine.reporter"]
