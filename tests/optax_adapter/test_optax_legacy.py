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
