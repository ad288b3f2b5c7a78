"""The package layout of lamflow.model: imports point down only, and no module imports itself
back through others (module-level and function-level imports both count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "model"
# lowest first: a package imports only packages of a lower rank (or its own)
RANK = {"errors": 0, "schema": 0, "data": 1, "nn": 2, "io": 3, "training": 4, "tasks": 5}


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("lamflow", "model") + p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            edges[m] |= {t for t in names if t in mods and t != m and not m.startswith(t + ".")}
    return edges


def package(mod: str) -> str:
    return mod.split(".")[2] if mod.count(".") >= 2 else ""


def test_model_packages_import_only_lower_packages():
    edges = imports(modules())
    upward = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts
                    if package(m) in RANK and package(t) in RANK and RANK[package(t)] > RANK[package(m)])
    assert upward == []


def test_model_modules_import_no_circle():
    edges = imports(modules())
    state: dict[str, int] = {}
    cycles = []

    def visit(v, path):
        state[v] = 1
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v, [v])
    assert cycles == []


def test_every_model_package_is_ranked():
    assert {package(m) for m in modules() if m.count(".") >= 2} <= set(RANK)
