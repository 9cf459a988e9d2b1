"""No import cycles in the package, and every module imports alone (issue 10 F3).

Object kinds are registered in one place (mlx5tlp/registry.py) so that ``Context``,
``import_blob`` and unpickling need no import of every class; this keeps it that way:

* a static graph of the module-level imports of python/mlx5tlp (``import`` / ``from ...
  import`` outside functions and ``if TYPE_CHECKING:``) has no cycle; ``from pkg import sub``
  of a submodule is an edge to the submodule only;
* each module imports on its own in a fresh interpreter.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "mlx5tlp"
EXTENSIONS = {"mlx5tlp._core"}  # compiled: imports nothing of the package


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = {f"{module}.{a.name}" for a in node.names} & known
                found.update(subs)
                if len(subs) < len(node.names):  # a name defined by the module itself
                    found.add(module)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in known and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(u: str) -> list[str]:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return [*stack[stack.index(v):], v]
            if v not in state and (c := dfs(v)):
                return c
        stack.pop()
        state[u] = 2
        return []

    for node in sorted(graph):
        if node not in state and (c := dfs(node)):
            return c
    return []


def test_no_module_level_import_cycle() -> None:
    modules = _modules()
    known = set(modules) | EXTENSIONS
    graph = {n: _module_level_imports(n, p, known) for n, p in modules.items()}
    graph.update({e: set() for e in EXTENSIONS})
    assert len(graph) > 40 and "mlx5tlp.registry" in graph["mlx5tlp.context"]
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
    # The kind classes are found through the registry, not imported by who dispatches.
    for dispatcher in ("mlx5tlp.context", "mlx5tlp._object", "mlx5tlp.registry"):
        assert not graph[dispatcher] & {"mlx5tlp.var", "mlx5tlp.umem", "mlx5tlp.devx_obj"}


def test_cycle_detection_finds_a_cycle() -> None:
    # The checker itself: a planted two-module loop is reported.
    assert _cycle({"a": {"b"}, "b": {"a"}, "c": set()}) == ["a", "b", "a"]


def test_every_module_imports_alone() -> None:
    names = [n for n in _modules() if not n.endswith("__main__")]  # __main__ runs the CLI
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    failed = []
    for i in range(0, len(names), 4):  # four fresh interpreters at a time
        procs = [(n, subprocess.Popen(
            [sys.executable, "-c", f"import importlib; importlib.import_module({n!r})"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for n in names[i:i + 4]]
        for n, proc in procs:
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                failed.append(f"{n}: {err.strip().splitlines()[-1] if err.strip() else '?'}")
    assert not failed, "\n".join(failed)


def test_every_kind_is_registered() -> None:
    import mlx5tlp
    from mlx5tlp import registry
    from mlx5tlp.envelope import Kind

    assert {k: registry.kind_class(k) for k in Kind} == {
        Kind.VAR: mlx5tlp.Var, Kind.UMEM: mlx5tlp.Umem, Kind.DEVX_OBJ: mlx5tlp.DevxObj}
