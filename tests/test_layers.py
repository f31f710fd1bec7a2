"""The package's three layers stay separate (read from the source with `ast`, nothing is imported).

- the method (`rpg/*.py`, `rpg/nn/`, `rpg/vision/`) never imports an experiment or an entry point;
- an experiment family (`rpg/experiments/<family>/`) imports the method and the shared experiment helpers
  (`rpg/experiments/*.py`), never another family and never an entry point;
- no import cycle between the package's modules (imports inside functions count too).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rpg"
FAMILIES = ("task_zoo", "arch_study")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every `rpg...` module a file imports (absolute or relative, at any depth of the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "rpg" or m.startswith("rpg.")}


@functools.cache  # parsed once per session, not once per parametrized test
def all_modules() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # `from rpg.x import f` names rpg.x.f: keep only real modules (the longest existing prefix).
        deps = set()
        for imp in imported_modules(path):
            parts = imp.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts:
                deps.add(".".join(parts))
        graph[name] = deps - {name}
    return graph


def layer(module: str) -> str:
    if module.startswith("rpg.cli"):
        return "entry"
    for family in FAMILIES:
        if module.startswith(f"rpg.experiments.{family}"):
            return family
    if module.startswith("rpg.experiments"):
        return "experiments-shared"
    return "method"


ALLOWED = {
    "method": {"method"},
    "experiments-shared": {"method", "experiments-shared"},
    "task_zoo": {"method", "experiments-shared", "task_zoo"},
    "arch_study": {"method", "experiments-shared", "arch_study"},
    "entry": {"method", "experiments-shared", "task_zoo", "arch_study", "entry"},
}


def test_every_module_is_in_a_layer():
    graph = all_modules()
    assert {"rpg.model", "rpg.experiments.task_zoo.pipeline", "rpg.experiments.arch_study.study",
            "rpg.cli.main"} <= set(graph)


@pytest.mark.parametrize("module", sorted(all_modules()))
def test_imports_respect_the_layers(module):
    graph = all_modules()
    bad = sorted(dep for dep in graph[module] if layer(dep) not in ALLOWED[layer(module)])
    assert not bad, f"{module} ({layer(module)}) must not import {bad}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + ".") or node.startswith(dep + "."):
                continue  # a package and its own submodules (the __init__ re-exports)
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(all_modules())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_violations(tmp_path):
    """The rules above can fail: a cycle and a method -> experiment import are found in a made-up graph."""
    assert find_cycle({"rpg.a": {"rpg.b"}, "rpg.b": {"rpg.a"}}) == ["rpg.a", "rpg.b", "rpg.a"]
    assert layer("rpg.experiments.task_zoo.heads") not in ALLOWED[layer("rpg.model")]
    assert layer("rpg.experiments.arch_study.study") not in ALLOWED[layer("rpg.experiments.task_zoo.tables")]
    src = tmp_path / "m.py"
    src.write_text("from rpg.experiments.task_zoo import heads\nimport rpg.cli\n")
    assert {"rpg.experiments.task_zoo", "rpg.experiments.task_zoo.heads", "rpg.cli"} <= imported_modules(src)
