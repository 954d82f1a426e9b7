"""An Optax state written by safeopt 0.1.0 loads through ``upgrade_state_dict``."""

from __future__ import annotations

import json
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import optax
import pytest

import safeopt
import safeopt_optax

FIXTURES = Path(__file__).parents[1] / "fixtures" / "v0_1_0"


def test_a_0_1_state_loads_and_training_goes_on() -> None:
    meta = json.loads((FIXTURES / "optax_adam.json").read_text())
    saved = flax.serialization.msgpack_restore((FIXTURES / "optax_adam.msgpack").read_bytes())
    params = jax.tree.map(jnp.asarray, saved["params"])
    tx = safeopt.wrap(optax.adam(1e-2), meta["policy"])
    state = safeopt_optax.upgrade_state_dict(saved["opt_state"], tx.init(params))
    stats, want = safeopt.stats(state), meta["stats"]
    for key in ("steps", "skips", "nonfinite", "spikes", "norm_clips"):
        assert stats[key] == want[key], key
    for key in ("last_norm", "last_scale", "threshold", "last_loss", "last_weight_norm"):
        assert stats[key] == pytest.approx(want[key]), key
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = jax.jit(tx.update)(grads, state, params, value=jnp.float32(1.0))
    assert safeopt.stats(state)["steps"] == want["steps"] + 1


def test_a_current_state_round_trips_through_the_same_function() -> None:
    params = {"w": jnp.ones(3)}
    tx = safeopt.wrap(optax.adam(1e-2), {"adaptive": "zscore"})
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full(3, 2.0)}, state, params)
    saved = flax.serialization.to_state_dict(state)
    again = safeopt_optax.upgrade_state_dict(saved, tx.init(params))
    assert safeopt.stats(again) == safeopt.stats(state)


def _recovering_run(tx, params):
    """A snapshot, then a restore (a NaN weight): the state holds both."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(4):
        given = jax.tree.map(lambda p: p.at[0].set(jnp.nan), params) if i == 3 else params
        updates, state = update(jax.tree.map(lambda p, i=i: p * 0 + 0.1 * i, params), state,
                                given)
        params = safeopt_optax.apply_updates(given, updates, state)
    return params, state


def test_a_recovering_state_round_trips_with_its_snapshot() -> None:
    params = {"w": jnp.arange(3.0), "b": jnp.ones(2)}
    policy = {"recover": True, "snapshot_every": 2, "monitor_every": 1}
    tx = safeopt.wrap(optax.adam(1e-2), policy)
    params, state = _recovering_run(tx, params)
    assert safeopt.stats(state)["recoveries"] == 1
    saved = flax.serialization.msgpack_restore(flax.serialization.to_bytes(state))
    again = safeopt_optax.upgrade_state_dict(saved, tx.init(params))
    assert safeopt.stats(again) == safeopt.stats(state)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    direct = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
    assert jax.tree.structure(direct) == jax.tree.structure(state)


@pytest.mark.parametrize("saved_policy", [{"adaptive": "zscore"}, None],
                         ids=["current_without_recover", "0.1"])
def test_a_state_without_snapshot_loads_into_a_recovering_one(saved_policy) -> None:
    if saved_policy is None:
        meta = json.loads((FIXTURES / "optax_adam.json").read_text())
        raw = flax.serialization.msgpack_restore((FIXTURES / "optax_adam.msgpack").read_bytes())
        params, saved, policy = jax.tree.map(jnp.asarray, raw["params"]), raw["opt_state"], \
            meta["policy"]
    else:
        params, policy = {"w": jnp.ones(3)}, saved_policy
        tx = safeopt.wrap(optax.adam(1e-2), policy)
        _, old = tx.update({"w": jnp.full(3, 2.0)}, tx.init(params), params)
        saved = flax.serialization.to_state_dict(old)
        assert "params" not in saved["snapshot"]
    tx = safeopt.wrap(optax.adam(1e-2), {**policy, "recover": True, "snapshot_every": 1})
    state = safeopt_optax.upgrade_state_dict(saved, tx.init(params))
    stats = safeopt.stats(state)
    assert stats["recoveries"] == 0 and stats["last_recovery"] is None
    assert int(state.safe.recovery.snapshot_at) == -1  # no snapshot held yet
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = jax.jit(tx.update)(grads, state, params, value=jnp.float32(1.0))
    assert int(state.safe.recovery.snapshot_at) == stats["steps"] + stats["skips"]
