"""The torch adapter's layout, checked: small modules, no import cycle between them."""

from __future__ import annotations

import ast
from pathlib import Path

import safeopt_torch

PACKAGE = Path(safeopt_torch.__file__).parent


def _imports(path: Path) -> set[str]:
    """The ``safeopt_torch`` modules ``path`` imports at module level (type-only ones left out)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "safeopt_torch":
            found |= {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safeopt_torch."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
    return found


def test_modules_are_small() -> None:
    sizes = {path.name: len(path.read_text(encoding="utf-8").splitlines())
             for path in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_no_import_cycle() -> None:
    graph = {path.stem: _imports(path) for path in PACKAGE.glob("*.py")}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in graph.get(name, ()):
            visit(dep, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())
