"""Divergence guard, diagnosis and telemetry through the Keras adapter (any backend)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import safeopt  # noqa: E402
import safeopt_keras  # noqa: E402
from safeopt import telemetry as _telemetry  # noqa: E402
from safeopt_keras.callbacks import SafeoptTelemetry  # noqa: E402

BATCH = 8


def _model(policy: dict) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=safeopt.wrap(keras.optimizers.SGD(0.05), policy), loss="mse")
    return model


def _data(n_batches: int, poison: range = range(0)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_batches * BATCH, 4)).astype(np.float32)
    y = 0.1 * rng.normal(size=(n_batches * BATCH, 1)).astype(np.float32)
    for b in poison:
        x[b * BATCH:(b + 1) * BATCH] = np.nan
    return x, y


def test_ten_nan_batches_raise_on_the_fifth_skip_with_diagnosis() -> None:
    model = _model({"max_consecutive_skips": 5})
    x, y = _data(20, poison=range(3, 13))
    seen: list[int] = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda b, logs: seen.append(b))
    callbacks = [counter, safeopt_keras.DivergenceGuard()]
    with pytest.raises(safeopt.DivergenceError) as info:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=callbacks)
    # Stopped by the batch that made the fifth skip in a row: at its end on the compiled
    # backends (DivergenceGuard), inside its step on the torch backend.
    assert seen[-1] == 3 + 4
    err = info.value
    assert err.stats["consecutive_skips"] == 5 and err.stats["skips"] == 5
    assert err.diagnosis is not None and err.diagnosis.fired("nonfinite")
    assert err.diagnosis.signs[0].since == 3 and "NaN/Inf" in str(err)
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)


def test_telemetry_callback_writes_records_and_diagnosis_has_names(tmp_path) -> None:
    log = tmp_path / "keras.jsonl"
    model = _model({"log_every": 4, "log_file": str(log)})
    x, y = _data(12)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[SafeoptTelemetry()])
    _telemetry.close_sinks()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert records[-1]["applied"] == 12 and records[-1]["loss"] is not None
    assert all(math.isfinite(r["grad_norm"]) for r in records)
    names = list(records[-1]["layers"])
    variable_paths = [v.path for v in model.trainable_variables]
    assert set(names) == set(variable_paths)
    diagnosis = safeopt.diagnose(model.optimizer)
    assert diagnosis.updates == 12 and not diagnosis.fired("nonfinite")


def test_telemetry_callback_validates_log_every() -> None:
    with pytest.raises(ValueError, match="log_every"):
        SafeoptTelemetry(log_every=0)
