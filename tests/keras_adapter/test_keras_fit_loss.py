"""``model.fit`` hands the loss to the policy (through ``scale_loss``), and saved models load.

Run once per backend (``KERAS_BACKEND=tensorflow|jax|torch``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import safeopt  # noqa: E402

F32 = np.float32


def _model(seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                             keras.layers.Dense(1)])


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype(F32), rng.normal(size=(n, 1)).astype(F32)


def test_fit_hands_each_steps_loss_to_the_policy() -> None:
    model = _model()
    model.compile(optimizer=safeopt.wrap(keras.optimizers.SGD(0.05), {"clip_norm": 1.0}),
                  loss="mse")
    x, y = _data(8)
    # One batch per epoch: each epoch's logged loss is that step's loss.
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    stats = safeopt.stats(model.optimizer)
    assert stats["steps"] == 3
    assert stats["last_loss"] == pytest.approx(history.history["loss"][-1], rel=1e-6)


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_spike_skip_on_the_loss_works_in_fit(steps_per_execution: int) -> None:
    if steps_per_execution > 1 and keras.backend.backend() == "torch":
        pytest.skip("Keras's torch trainer runs one step per execution")
    model = _model()
    policy = {"spike_skip": "loss", "spike_warmup": 3, "spike_window": 8, "spike_k": 3.0}
    model.compile(optimizer=safeopt.wrap(keras.optimizers.SGD(1e-3), policy), loss="mse",
                  steps_per_execution=steps_per_execution)
    x, y = _data(8)
    xs, ys = np.concatenate([x] * 6), np.concatenate([y] * 5 + [y * 1000.0])  # a spike last
    model.fit(xs, ys, batch_size=8, epochs=1, verbose=0, shuffle=False)
    stats = safeopt.stats(model.optimizer)
    assert (stats["spikes"], stats["skips"], stats["steps"]) == (1, 1, 5)
    assert stats["nonfinite"] == 0 and np.isfinite(stats["last_loss"])


def test_a_loss_scale_factor_is_applied_and_the_unscaled_loss_kept() -> None:
    opt = safeopt.wrap(keras.optimizers.SGD(0.1, loss_scale_factor=4.0))
    model = _model()
    model.compile(optimizer=opt, loss="mse")
    x, y = _data(8)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert safeopt.stats(opt)["last_loss"] == pytest.approx(history.history["loss"][0],
                                                            rel=1e-6)


def test_a_loss_scale_optimizer_outside_does_not_hand_the_loss_on() -> None:
    opt = safeopt.wrap(keras.optimizers.SGD(0.1))
    model = _model()
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(opt), loss="mse")
    x, y = _data(8)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    stats = safeopt.stats(opt)
    assert stats["steps"] + stats["skips"] == 1 and stats["last_loss"] is None


def test_last_loss_is_absent_when_no_loss_was_given() -> None:
    opt = safeopt.wrap(keras.optimizers.SGD(0.1))
    var = keras.Variable(np.ones(2, F32))
    opt.apply_gradients([(keras.ops.ones((2,)), var)])
    stats = safeopt.stats(opt)
    assert stats["steps"] == 1 and stats["last_loss"] is None


def _load(path: Any, imports: str) -> subprocess.CompletedProcess:
    code = (f"{imports}\nm = keras.models.load_model({str(path)!r})\n"
            "print(type(m.optimizer).__name__, safeopt.stats(m.optimizer)['steps'])")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, check=False)


def test_a_saved_model_loads_in_a_fresh_process(tmp_path: Any) -> None:
    preload = {ep.name: ep.value for ep in metadata.entry_points(group="safeopt.preload")}
    assert preload.get("keras") == "safeopt_keras", (
        "safeopt's installed metadata lacks its `safeopt.preload` entry point: reinstall it")
    model = _model()
    model.compile(optimizer=safeopt.wrap(keras.optimizers.Adam(1e-3), {"clip_norm": 0.5}),
                  loss="mse")
    x, y = _data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    for imports in ("import keras, safeopt", "import safeopt, keras, safeopt_keras"):
        out = _load(path, imports)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-2:] == ["SafeOptimizer", "2"]
    # safeopt imported before Keras: Keras's error names the module to import.
    out = _load(path, "import safeopt, keras")
    assert out.returncode != 0 and "'module': 'safeopt_keras._optimizer'" in out.stderr
