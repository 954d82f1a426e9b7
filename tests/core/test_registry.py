"""Adapter discovery: entry points, plug-ins, errors."""

from __future__ import annotations

import warnings
from importlib import metadata

import numpy as np
import pytest

import safeopt
import safeopt.adapter as sa
from safeopt import _registry

safeopt_toy = pytest.importorskip("safeopt_toy", reason="the toy plug-in distribution")


def test_third_party_plugin_wraps_through_the_public_api() -> None:
    params = [np.zeros(2, np.float32), np.zeros(1, np.float32)]
    opt = safeopt.wrap(safeopt_toy.ToySGD(params, lr=1.0), {"clip_norm": 1.0})
    opt.step([np.array([3.0, 0.0], np.float32), np.array([4.0], np.float32)])
    np.testing.assert_allclose(params[0], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(params[1], [-0.8], rtol=1e-6)
    opt.step([np.array([np.nan, 0.0], np.float32), np.array([1.0], np.float32)])
    np.testing.assert_allclose(params[1], [-0.8], rtol=1e-6)  # skipped
    stats = safeopt.stats(opt)
    assert stats["framework"] == "toy"
    assert (stats["steps"], stats["skips"], stats["norm_clips"]) == (1, 1, 1)
    assert stats["last_norm"] == pytest.approx(5.0)


def test_plugin_is_listed() -> None:
    names = {row["name"]: row["status"] for row in sa.installed_adapters()}
    assert names["safeopt_toy"] == "loaded"
    assert {"torch", "optax", "keras"} <= set(names)


def test_wrap_validates_the_policy_first() -> None:
    toy = safeopt_toy.ToySGD([np.zeros(1, np.float32)])
    with pytest.raises(safeopt.PolicyError, match="clip_norm"):
        safeopt.wrap(toy, {"clip_nrom": 1.0})
    with pytest.raises(safeopt.PolicyError, match="clip_norm=-1"):
        safeopt.wrap(toy, {"clip_norm": -1})


def test_unknown_object_lists_installed_adapters() -> None:
    with pytest.raises(safeopt.AdapterError) as info:
        safeopt.wrap(object(), "default")
    message = str(info.value)
    assert "builtins.object" in message and "safeopt_toy (loaded)" in message
    assert "torch" in message


def test_wrapping_twice_is_refused() -> None:
    opt = safeopt.wrap(safeopt_toy.ToySGD([np.zeros(1, np.float32)]))
    with pytest.raises(safeopt.AdapterError, match="already wrapped"):
        safeopt.wrap(opt)


def test_broken_plugin_warns_instead_of_crashing(monkeypatch) -> None:
    broken = metadata.EntryPoint(name="json", value="safeopt_no_such_module:Adapter",
                                 group=sa.GROUP)
    eps = (*_registry._entry_points(), broken)
    monkeypatch.setattr(_registry, "_entry_points", lambda: eps)
    monkeypatch.setattr(_registry, "_LOADED", {})
    with pytest.warns(RuntimeWarning, match="failed to load"):
        opt = safeopt.wrap(safeopt_toy.ToySGD([np.zeros(1, np.float32)]))
    assert safeopt.stats(opt)["framework"] == "toy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded once: no second warning
        safeopt.wrap(safeopt_toy.ToySGD([np.zeros(1, np.float32)]))


def test_stats_of_a_foreign_object() -> None:
    with pytest.raises(safeopt.AdapterError, match="not made by safeopt.wrap"):
        safeopt.stats(object())


def test_check_raises_after_too_many_skips() -> None:
    opt = safeopt.wrap(safeopt_toy.ToySGD([np.zeros(1, np.float32)]),
                       {"max_consecutive_skips": 3})
    bad = [np.array([np.nan], np.float32)]
    for _ in range(2):
        opt.step(bad)
        assert safeopt.check(opt)["consecutive_skips"] < 3
    with pytest.raises(safeopt.DivergenceError, match="3 consecutive") as info:
        opt.step(bad)  # the plug-in raises from its step, through the core's check
    assert info.value.stats["skips"] == 3
    assert "NaN/Inf" in str(info.value) and info.value.diagnosis.fired("a")
    with pytest.raises(safeopt.DivergenceError, match="3 consecutive"):
        safeopt.check(opt)


def test_namespace_never_imports_a_framework() -> None:
    import sys

    if "torch" not in sys.modules:
        with pytest.raises(ValueError, match="import torch"):
            sa.namespace_by_name("torch")
    assert sa.namespace(np.zeros(1)).name == "numpy"
