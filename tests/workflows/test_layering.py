"""The import graph of lamflow's pipeline layers: no circle among the modules of ops/ and
workflows/ (function-level imports count: they are real dependencies, only deferred), and
arrows point down only (workflows -> ops -> model; ops never imports workflows, model never ops,
workflows or dflow)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LAYERS = {"model": "lamflow.model", "ops": "lamflow.ops", "workflows": "lamflow.workflows"}


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the three layers."""
    out = {}
    for folder, pkg in LAYERS.items():
        for f in sorted((REPO / folder).rglob("*.py")):
            rel = f.relative_to(REPO / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((pkg, *rel))] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every lamflow module (and `dflow`) that the module imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            if t.split(".")[0] == "dflow":
                out.add("dflow")
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_ops_and_workflows_have_no_import_circle_and_no_upward_arrow():
    known = modules()
    graph = {m: imports_of(m, f, known) for m, f in known.items()}
    pipeline = {m: deps for m, deps in graph.items() if not m.startswith("lamflow.model")}
    assert cycles(pipeline) == []
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
              if (m.startswith("lamflow.ops") and d.startswith("lamflow.workflows"))
              or (m.startswith("lamflow.model") and (d == "dflow" or d.startswith(("lamflow.ops", "lamflow.workflows"))))]
    assert upward == []


def test_the_import_walker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\nimport dflow.python\n")
    known = {"lamflow.ops.a": pkg / "a.py", "lamflow.ops.b": pkg / "b.py"}
    graph = {m: imports_of(m, f, known) for m, f in known.items()}
    assert graph == {"lamflow.ops.a": {"lamflow.ops.b"}, "lamflow.ops.b": {"lamflow.ops.a", "dflow"}}
    assert cycles(graph) == [["lamflow.ops.a", "lamflow.ops.b"]]


MAX_LINES = 400  # one idea per module (issue 16); a longer one names the idea that needs the room here
LONG_OK: dict[str, str] = {}


def test_no_module_outgrew_one_idea():
    long = {str(f.relative_to(REPO)): n for f in modules().values() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert {f: n for f, n in long.items() if f not in LONG_OK} == {}
