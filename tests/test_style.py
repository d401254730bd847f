"""The code stays mechanically formatted and lint-clean: ``ruff format`` and ``ruff check`` run
as part of the test command (``./dev test``), so CI checks them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args", [["format", "--check", "."], ["check", "."]], ids=["format", "lint"]
)
def test_ruff(args):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (
        f"ruff {' '.join(args)} (run it to fix):\n{done.stdout}{done.stderr}"
    )


def _top_level_imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` imported at a module's top level (not under TYPE_CHECKING, not
    inside functions)."""
    import ast

    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


def test_no_import_cycle_in_ood_core():
    """Modules import each other one way only (lazy or TYPE_CHECKING imports do not count as
    edges, so this checks the module-level graph the interpreter actually walks)."""
    pkg = ROOT / "ood_core"
    modules = {}
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {
        m: {d for d in _top_level_imports(p, "ood_core") if d in modules and d != m}
        for m, p in modules.items()
    }
    # a package's __init__ importing its own submodules is how registration works: not a cycle
    for m in graph:
        graph[m] = {d for d in graph[m] if not (modules[m].name == "__init__" and d.startswith(m))}
    state: dict[str, int] = {}
    path_stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path_stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path_stack[path_stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path_stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "ood_core.engine" not in {d for d in graph["ood_core.scores.base"]} or not any(
        d.startswith("ood_core.scores") for d in graph["ood_core.engine"]
    )
