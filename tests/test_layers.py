"""The shape of the code, read from its own imports: every `import` statement of every module
counted (at the top, inside functions and under `if TYPE_CHECKING:`), so that a lazy or a
type-only import cannot hide a cycle. Arrows run one way: entry points -> the run and its uses ->
tasks -> models and data, with the leaves below them all."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
# Modules any layer may use, which use nothing above them: errors, reporting, checkpoints,
# processes and devices, the config schemas and the targets they build.
LEAVES = {"trainer.errors", "trainer.logging", "trainer.trackers", "trainer.tables",
          "trainer.checkpoint", "trainer.run_lock", "trainer.distributed", "trainer.launcher",
          "trainer.ranks", "trainer.signals", "trainer.config", "trainer.targets",
          "trainer.optim", "trainer.averaging"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The names an import statement brings in, made absolute (`from .x import y` too)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Each trainer module and the trainer modules it imports, however and wherever."""
    paths = {module_name(p): p for p in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [name for node in ast.walk(tree)
                 for name in imported(node, module, path.name == "__init__.py")]
        graph[module] = {name for name in names if name in paths and name != module}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 150  # it read the tree
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None


def test_leaves_import_no_layer_above_them():
    graph = import_graph()
    assert set(graph) >= LEAVES  # a renamed leaf must be renamed here too
    above = {leaf: sorted(graph[leaf] - LEAVES) for leaf in LEAVES if graph[leaf] - LEAVES}
    assert not above, f"leaves importing layers above them: {above}"


def test_data_and_models_never_import_the_run_the_tasks_or_the_commands():
    graph = import_graph()
    below = ("trainer.data", "trainer.models")
    wrong = {module: sorted(name for name in imports
                            if name not in LEAVES and not name.startswith(below))
             for module, imports in graph.items() if module.startswith(below)}
    assert not {module: names for module, names in wrong.items() if names}


def test_the_check_sees_lazy_and_type_only_imports(tmp_path):
    """A cycle through an import inside a function and one under TYPE_CHECKING is still one."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trainer.b import B\n"
              "def f():\n    from .b import g\n")
    tree = ast.parse(source)
    names = {n for node in ast.walk(tree) for n in imported(node, "trainer.a", False)}
    assert {"trainer.b", "trainer.b.B", "trainer.b.g"} <= names
