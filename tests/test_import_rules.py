"""The package's import rules (docs/architecture.md), checked from the source, as Ray's
``test_circular_imports.py`` does for Ray:

- every module imports on its own, in a process that has imported no other module of the package;
- no import cycle between the package's modules (imports inside functions included: a cycle
  there still ties the two modules together);
- ``io/`` imports neither Ray nor torch; ``algorithm/``, ``model/``, ``evaluation/`` and ``data/``
  do not import Ray;
- no module outside a folder imports that folder's private names (``_name``, ``_module``,
  ``_internal/``);
- no module over 450 lines, no function over 80 lines.

All but the first are static (``ast``); the first forks one child per module from a parent that
has imported the third-party libraries only, so it takes seconds, not a torch import per module.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "selfment_dist"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80

#: Folder → third-party top-level packages it must never import.
FORBIDDEN = {
    "io": {"ray", "torch"},
    "algorithm": {"ray"},
    "model": {"ray"},
    "evaluation": {"ray"},
    "data": {"ray"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _rel(name: str) -> str:
    return MODULES[name].relative_to(PACKAGE.parent).as_posix()


def _imports(name: str) -> list[tuple[str, int]]:
    """``(dotted target, line)`` of every import in module ``name``, anywhere in it; a
    ``from m import x`` gives ``m.x`` (a submodule or a name in ``m``)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            out += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _package_edges(name: str) -> set[str]:
    """The package's modules that ``name`` imports."""
    edges = set()
    for target, _ in _imports(name):
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name and target != "selfment_dist":
            edges.add(target)
    return edges


def test_every_module_imports_on_its_own():
    # Every third-party module the package names (``from m import x``: ``m.x``, else ``m``),
    # imported once in the parent: the children import only the package's own modules.
    third_party = sorted({target for name in MODULES for target, _ in _imports(name)
                          if not target.startswith("selfment_dist")
                          and importlib.util.find_spec(target.split(".")[0]) is not None})
    code = f"""
import importlib, os, sys, traceback
for lib in {third_party!r}:
    for candidate in (lib, lib.rpartition(".")[0]):
        try:
            importlib.import_module(candidate)
            break
        except Exception:
            pass
assert not [m for m in sys.modules if m.startswith("selfment_dist")]
failed = []
for name in {sorted(MODULES)!r}:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-500:] + proc.stderr[-3000:]


def test_no_import_cycle():
    graph = {name: _package_edges(name) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layers_keep_out_of_ray_and_torch(folder):
    bad = [f"{_rel(name)}:{line} imports {target}"
           for name in MODULES if name.startswith(f"selfment_dist.{folder}.")
           or name == f"selfment_dist.{folder}"
           for target, line in _imports(name) if target.split(".")[0] in FORBIDDEN[folder]]
    assert not bad, bad


def test_no_private_names_across_folders():
    bad = []
    for name in MODULES:
        for target, line in _imports(name):
            if not target.startswith("selfment_dist."):
                continue
            parts = target.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if owner in MODULES and MODULES[owner].name != "__init__.py":
                        owner = owner.rpartition(".")[0]  # a private name of a module: its folder
                    if not name.startswith(owner + "."):
                        bad.append(f"{_rel(name)}:{line} imports {target}")
                    break
    assert not bad, bad


def test_modules_and_functions_are_short():
    long_modules = {_rel(name) for name, path in MODULES.items()
                    if len(path.read_text(encoding="utf-8").splitlines()) > MAX_MODULE_LINES}
    long_functions = {f"{_rel(name)}:{node.name}" for name, tree in TREES.items()
                      for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long_modules, sorted(long_modules)
    assert not long_functions, sorted(long_functions)
