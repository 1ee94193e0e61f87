"""The layers of ARCHITECTURE.md hold: import-linter's contracts are kept and the import graph has no cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), over every import grimp sees --
    including imports inside functions."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in graph.modules or w.split(".")[0] not in ("mmkit", "mmkit_kernels"):
                continue
            if w == v.rsplit(".", 1)[0]:
                continue  # a module importing its own package (__init__) is how Python packages work
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for module in sorted(graph.modules):
        if module.split(".")[0] in ("mmkit", "mmkit_kernels") and module not in index:
            visit(module)
    return found


def test_import_graph_has_no_cycle():
    graph = grimp.build_graph("mmkit", "mmkit_kernels", include_external_packages=False, cache_dir=None,
                              exclude_type_checking_imports=True)  # annotations only, never executed
    # a package's __init__ re-exporting its own submodules is not a cycle of the design: drop those edges
    for module in list(graph.modules):
        for imported in list(graph.find_modules_directly_imported_by(module)):
            if imported.startswith(module + "."):
                graph.remove_import(importer=module, imported=imported)
    assert _cycles(graph) == []


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    run = subprocess.run([exe, "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def _function_level_imports():
    """(file, line, statement, reason) for every import inside a function in mmkit and mmkit_kernels. The reason
    is a comment on the import's line or on the comment lines directly above its group of imports."""
    import ast

    out = []
    for path in sorted([*(ROOT / "mmkit").rglob("*.py"), *(ROOT / "kernels" / "mmkit_kernels").rglob("*.py")]):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                line = lines[node.lineno - 1]
                reason = line.split("#", 1)[1].strip() if "#" in line else ""
                k = node.lineno - 2
                while not reason and k >= 0:  # walk up over the imports (and blank lines) of the same group
                    text = lines[k].strip()
                    if text.startswith("#"):
                        reason = text[1:].strip()
                    elif not (text.startswith(("import ", "from ")) or text == ""):
                        break
                    k -= 1
                out.append((str(path.relative_to(ROOT)), node.lineno, ast.unparse(node), reason))
    return out


def test_imports_inside_functions_say_why():
    missing = [f"{f}:{n}: {stmt}" for f, n, stmt, reason in _function_level_imports() if not reason]
    assert missing == [], "imports inside functions need a one-line reason comment:\n" + "\n".join(missing)
