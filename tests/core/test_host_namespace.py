"""The "host" namespace (NumPy scalars) takes exactly the decisions of the "numpy" one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeopt.adapter as sa
from safeopt import Policy
from safeopt.adapter import GradStats, decide, init_state

numpy_xp = sa.namespace_by_name("numpy")
host_xp = sa.namespace_by_name("host")

POLICIES = {
    "default": Policy(),
    "strict": Policy.from_preset("strict"),
    "zscore": Policy.from_preset("zscore").replace(warmup=3),
    "percentile": Policy(adaptive="percentile", percentile=90.0, history=8, warmup=2),
    "spike-loss": Policy(spike_skip="loss", spike_window=6, spike_warmup=3),
    "spike-norm": Policy(spike_skip="grad_norm", spike_window=6, spike_warmup=3),
    "weights-above": Policy(l2=1e-3, penalty_when="weights_above", weight_norm_max=4.0,
                            weight_growth_max=0.5),
    "monitor-off": Policy(monitor_every=0, clip_value=0.5),
    "no-clip": Policy(clip_norm=None, monitor_window=5),
    "recover": Policy(recover=True, snapshot_every=3, recover_patience=2, spike_warmup=3,
                      spike_window=6, max_consecutive_skips=4),
}

values = st.one_of(st.floats(0, 50, width=32),
                   st.sampled_from([math.nan, math.inf, 0.0, 1.0]))
step = st.tuples(values, st.lists(st.floats(0, 5, width=32), min_size=3, max_size=3),
                 st.one_of(st.none(), st.floats(0.015625, 10, width=32), st.just(math.nan)),
                 st.floats(0.5, 8, width=32))


def _stats(host: bool, norm: float, layers: list[float], loss: float | None,
           weight_norm: float) -> GradStats:
    def scalar(v: float | None):
        if v is None:
            return None
        return np.float32(v) if host else np.asarray(v, np.float32)

    return GradStats(norm=scalar(norm), raw_norm=scalar(norm), loss=scalar(loss),
                     max_abs=scalar(norm), weight_norm=scalar(weight_norm),
                     tensor_norms=np.asarray(layers, np.float32))


def _same(a, b, where: str) -> None:
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    assert a_arr.dtype == b_arr.dtype, (where, a_arr.dtype, b_arr.dtype)
    assert a_arr.shape == b_arr.shape, where
    assert np.array_equal(a_arr, b_arr, equal_nan=True), (where, a_arr, b_arr)


@settings(max_examples=60, deadline=None)
@pytest.mark.parametrize("name", sorted(POLICIES))
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_host_decisions_equal_numpy_bit_for_bit(name: str, steps) -> None:
    policy = POLICIES[name]
    if policy.spike_skip == "loss":
        steps = [(n, layers, 1.0 if loss is None else loss, w) for n, layers, loss, w in steps]
    ref = init_state(numpy_xp, policy, n_tensors=3)
    got = init_state(host_xp, policy, n_tensors=3)
    with np.errstate(all="ignore"):
        for i, (norm, layers, loss, w) in enumerate(steps):
            d_ref, ref = decide(numpy_xp, policy, ref, _stats(False, norm, layers, loss, w))
            d_got, got = decide(host_xp, policy, got, _stats(True, norm, layers, loss, w))
            for field, a, b in zip(d_ref._fields, d_ref, d_got):
                if a is None:  # a feature the policy does not use
                    assert b is None, field
                    continue
                _same(a, b, f"step {i} decision.{field}")
            for (key, a), b in zip(sa.flatten(ref).items(), sa.flatten(got).values()):
                _same(a, b, f"step {i} state.{key}")


def test_host_values_are_numpy_scalars() -> None:
    state = init_state(host_xp, Policy(), n_tensors=2)
    with np.errstate(all="ignore"):
        decision, state = decide(host_xp, Policy(), state,
                                 GradStats(norm=np.float32(3.0), raw_norm=np.float32(3.0)))
    assert type(decision.scale) is np.float32 and decision.scale == np.float32(1 / 3.0)
    assert type(state.counters.steps) is np.int32 and state.counters.steps == 1
    assert isinstance(state.monitor.layer_norm_ema, np.ndarray)


@pytest.mark.parametrize(("a", "b"), [(np.float32(1), math.nan), (math.nan, np.float32(1)),
                                      (np.float32(2), 1), (np.float32(-0.0), np.float32(0.0)),
                                      (np.int32(3), np.float32(2.5)), (2.0, 3.0)])
def test_host_minimum_maximum_follow_numpy(a, b) -> None:
    for op in ("minimum", "maximum"):
        _same(getattr(host_xp, op)(a, b), getattr(np, op)(a, b), op)
