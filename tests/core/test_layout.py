"""The architecture, checked: a framework-free core, no cycles, small modules and API."""

from __future__ import annotations

import ast
from pathlib import Path

import safeopt
import safeopt.adapter

SRC = Path(safeopt.__file__).parent
TOY = Path(__file__).parents[1] / "plugins" / "safeopt_toy" / "safeopt_toy" / "__init__.py"
FRAMEWORKS = {"torch", "jax", "jaxlib", "keras", "tensorflow", "optax", "flax"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Imports at module level, outside ``if TYPE_CHECKING:`` blocks."""
    found: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        found += _imported(node)
    return found


def test_no_module_of_the_core_imports_a_framework() -> None:
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            for module in _imported(node):
                assert module.split(".")[0] not in FRAMEWORKS, f"{name} imports {module}"


def test_the_core_has_no_import_cycle_and_no_hidden_import() -> None:
    modules = _modules()
    graph = {name: {m for m in _runtime_imports(tree) if m in modules and m != name}
             for name, tree in modules.items()}
    for name, tree in modules.items():  # a function-level import would hide a cycle
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    hidden = [m for m in _imported(inner) if m.split(".")[0] == "safeopt"]
                    assert not hidden, f"{name}.{node.name} imports {hidden}"
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_modules_are_small() -> None:
    sizes = {path.name: len(path.read_text().splitlines()) for path in SRC.rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_the_public_api_is_layered_and_small() -> None:
    assert len(safeopt.__all__) <= 14
    assert {"wrap", "Policy", "load_policy", "stats", "check", "diagnose", "DivergenceError",
            "PolicyError", "AdapterError", "add_sink", "after_step"} <= set(safeopt.__all__)
    assert {"Adapter", "Kernels", "step", "decide", "init_state"} <= set(safeopt.adapter.__all__)


def test_the_toy_plugin_uses_only_the_plugin_api() -> None:
    tree = ast.parse(TOY.read_text(encoding="utf-8"))
    used = {m for node in ast.walk(tree) for m in _imported(node) if m.startswith("safeopt")}
    assert used == {"safeopt.adapter"}, used
