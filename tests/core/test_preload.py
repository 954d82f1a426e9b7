"""``import safeopt`` imports the ``safeopt.preload`` modules of frameworks imported before it."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

import pytest

from safeopt import _registry


def _entry(framework: str, module: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=framework, value=module, group=_registry.PRELOAD)


def test_preload_imports_only_for_imported_frameworks(tmp_path: Any, monkeypatch: Any) -> None:
    for name in ("preload_probe_a", "preload_probe_b"):
        (tmp_path / f"{name}.py").write_text("LOADED = True\n")
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "preload_probe_broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    not_imported = "a_framework_nobody_imported"
    assert not_imported not in sys.modules and "json" in sys.modules  # json: pytest's
    entries = (_entry("json", "preload_probe_a"), _entry(not_imported, "preload_probe_b"),
               _entry("json", "preload_probe_broken"))
    monkeypatch.setattr(_registry, "_group", lambda group: entries)
    with pytest.warns(RuntimeWarning, match="could not preload 'preload_probe_broken'.*boom"):
        _registry.preload()
    assert "preload_probe_a" in sys.modules and "preload_probe_b" not in sys.modules


def test_safeopt_lists_the_keras_adapter_for_preloading() -> None:
    entries = {ep.name: ep.value for ep in metadata.entry_points(group=_registry.PRELOAD)}
    assert entries.get("keras") == "safeopt_keras", (
        "safeopt's installed metadata lacks its `safeopt.preload` entry point: reinstall "
        f"safeopt (pip install -e .). Found: {entries}")
