"""A ``.keras`` model saved with safeopt 0.1.0's optimizer loads, and fit goes on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import safeopt  # noqa: E402
import safeopt_keras  # noqa: E402, F401 - registers SafeOptimizer for load_model

FIXTURES = Path(__file__).parents[1] / "fixtures" / "v0_1_0"
BACKEND = keras.backend.backend()


def test_a_0_1_model_file_loads_with_its_optimizer_state() -> None:
    model = keras.models.load_model(FIXTURES / f"keras_{BACKEND}.keras")
    want = json.loads((FIXTURES / f"keras_{BACKEND}.json").read_text())
    stats = safeopt.stats(model.optimizer)
    for key in ("steps", "skips", "nonfinite", "norm_clips", "iterations"):
        assert stats[key] == want[key], key
    for key in ("last_norm", "last_scale", "threshold", "last_weight_norm"):
        assert stats[key] == pytest.approx(want[key]), key
    assert stats["last_loss"] is None  # 0.1 stored NaN: no loss was ever given
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert safeopt.stats(model.optimizer)["steps"] == want["steps"] + 2


def test_a_saved_model_round_trips(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=safeopt.wrap(keras.optimizers.Adam(1e-2),
                                         {"adaptive": "percentile", "warmup": 1}), loss="mse")
    x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    before, after = safeopt.stats(model.optimizer), safeopt.stats(again.optimizer)
    before.pop("names"), after.pop("names")  # Keras prefixes the paths differently on load
    assert after == before
