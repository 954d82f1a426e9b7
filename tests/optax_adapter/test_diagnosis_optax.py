"""Divergence guard, diagnosis and telemetry through the Optax adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import safeopt  # noqa: E402
from safeopt import telemetry as _telemetry  # noqa: E402


def _params() -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"hidden": {"kernel": jax.random.normal(k1, (4, 8)) * 0.5, "bias": jnp.zeros(8)},
            "out": {"kernel": jax.random.normal(k2, (8, 1)) * 0.5, "bias": jnp.zeros(1)}}


def _loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


def _train_step(tx: optax.GradientTransformation):
    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    return step


def _batch(i: int, poison: range = range(0)) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(i)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    if i in poison:
        x[:] = np.nan
    return jnp.asarray(x), jnp.asarray(rng.normal(size=(16, 1)).astype(np.float32))


def test_ten_nan_steps_raise_on_the_fifth_skip_at_the_host_boundary() -> None:
    tx = safeopt.wrap(optax.sgd(0.1), {"max_consecutive_skips": 5})
    params = _params()
    state = tx.init(params)
    step = _train_step(tx)
    calls = 0
    with pytest.raises(safeopt.DivergenceError) as info:
        for i in range(20):
            params, state = step(params, state, *_batch(i, poison=range(3, 13)))
            calls += 1
            safeopt.check(state)  # the host boundary of a jitted loop
    assert calls == 3 + 5
    err = info.value
    assert err.stats["consecutive_skips"] == 5
    assert err.diagnosis is not None and err.diagnosis.fired("nonfinite")
    assert err.diagnosis.signs[0].since == 3
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(params))


def test_unjitted_update_raises_on_the_fifth_skip_with_diagnosis() -> None:
    tx = safeopt.wrap(optax.adam(0.01), {"max_consecutive_skips": 5})
    params = _params()
    state = tx.init(params)
    nan_grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    for _ in range(4):
        _, state = tx.update(nan_grads, state, params)
    with pytest.raises(safeopt.DivergenceError) as info:
        tx.update(nan_grads, state, params)
    assert info.value.diagnosis is not None and info.value.diagnosis.fired("a")


def test_diagnosis_names_leaves_and_telemetry_from_a_jitted_loop(tmp_path) -> None:
    log = tmp_path / "optax.jsonl"
    tx = safeopt.wrap(optax.sgd(0.5), {"clip_norm": None, "log_every": 5,
                                       "log_file": str(log), "log_top_k": 2})
    params = _params()
    state = tx.init(params)
    step = _train_step(tx)
    for i in range(1, 21):
        params, state = step(params, state, *_batch(i))
        safeopt.after_step(state, i)
    _telemetry.close_sinks()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert records[-1]["loss"] is not None and len(records[-1]["layers"]) == 2
    # JAX key paths read as folders
    assert set(records[-1]["layers"]) <= {"hidden/bias", "hidden/kernel", "out/bias",
                                          "out/kernel"}
    diagnosis = safeopt.diagnose(state)
    assert diagnosis.updates == 20 and not diagnosis.fired("nonfinite")
