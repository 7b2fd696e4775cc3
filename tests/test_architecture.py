"""The layout holds: imports run one way, the loop names no method (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "igam"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int]]]:
    """(module -> igam modules it imports, at any depth of the file), [(module, line) of function-local
    igam imports]."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    local: list[tuple[str, int]] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        inside_functions = {id(n) for fn in ast.walk(tree)
                            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            hits = {r for t in targets if t.split(".")[0] == "igam" and (r := _resolve(t, mods)) and r != mod}
            edges[mod] |= hits
            if hits and id(node) in inside_functions:
                local.append((mod, node.lineno))
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring a package's own
    __init__ <-> child pairs only when nothing else is involved."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way() -> None:
    edges, _ = import_graph()
    assert len(edges) > 30  # the walk found the package
    assert cycles(edges) == []


def test_cycle_finder_finds_a_planted_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_function_local_igam_imports_only_in_the_cli() -> None:
    _, local = import_graph()
    assert [m for m, _ in local if m != "igam.cli"] == []


def test_the_training_loop_names_no_method() -> None:
    """No string constant of train.py is a method name, and cfg.method is never compared: what the loop
    needs from a method, the objective declares."""
    from igam.config import method_names

    code = (PKG / "train.py").read_text()
    tree = ast.parse(code)
    strings = {n.value.strip() for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert strings & set(method_names()) == set()
    compared = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and "cfg.method" in {ast.unparse(x) for x in (n.left, *n.comparators)}]
    assert compared == []


@pytest.mark.parametrize("folder", ["method", "attacks", "objectives", "models", "data", "report",
                                    "experiment"])
def test_folders_hold_their_concept(folder: str) -> None:
    assert (PKG / folder / "__init__.py").read_text().startswith('"""')
