"""Property tests of the decision function on the NumPy reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import safeopt.adapter as sa
from safeopt import Policy
from safeopt.adapter import FEATURES, GradStats, decide, init_state

xp = sa.namespace_by_name("numpy")
kernels = sa.Kernels(xp)

finite_floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)
any_floats = st.one_of(finite_floats, st.sampled_from([math.nan, math.inf, -math.inf]))


def _tensors(elements: st.SearchStrategy[float]) -> st.SearchStrategy[list[np.ndarray]]:
    shapes = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4)
    one = hnp.arrays(np.float32, shapes, elements=elements)
    return st.lists(one, min_size=1, max_size=4)


policies = st.builds(
    Policy,
    clip_norm=st.sampled_from([None, 1e-3, 0.5, 1.0, 10.0]),
    norm_scope=st.sampled_from(["global", "per_tensor"]),
    clip_value=st.sampled_from([None, 0.01, 0.5, 3.0]),
    skip_nonfinite=st.booleans(),
    l1=st.sampled_from([0.0, 1e-3]),
    l2=st.sampled_from([0.0, 1e-2]),
)


def _run(policy: Policy, grads: list[np.ndarray], params: list[np.ndarray] | None = None,
         state: sa.State | None = None, loss: float | None = None):
    state = init_state(xp, policy, n_tensors=len(grads)) if state is None else state
    if params is None:
        params = [np.ones_like(g) for g in grads]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf in NumPy
        out = sa.step(kernels, policy, state, grads, params,
                      None if loss is None else np.float32(loss))
    return out.grads, out.decision, state, out.state


@given(policy=policies, grads=_tensors(finite_floats))
def test_applied_step_respects_both_bounds(policy: Policy, grads) -> None:
    out, decision, _, _ = _run(policy, grads)
    assert not bool(decision.skip)
    if policy.clip_value is not None and policy.clip_norm is None:
        assert all(np.all(np.abs(g) <= policy.clip_value) for g in out)
    if policy.clip_value is not None:  # norm clipping only shrinks elements
        assert all(np.all(np.abs(g) <= policy.clip_value * (1 + 1e-6)) for g in out)
    if policy.clip_norm is not None:
        bound = policy.clip_norm * (1 + 1e-5)
        if policy.norm_scope == "global":
            total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in out))
            assert total <= bound
        else:
            assert all(np.linalg.norm(g.astype(np.float64)) <= bound for g in out)


@given(policy=policies, grads=_tensors(any_floats))
def test_scale_in_unit_interval_and_its_inverse_finite(policy: Policy, grads) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = sa.step(kernels, policy, init_state(xp, policy, len(grads)), grads,
                      [np.ones_like(g) for g in grads])
        clipped = np.logical_and(out.decision.clipped, policy.norm_scope == "global")
        inv = float(sa.inverse_scale(xp, out.stats.norm, out.decision.threshold, clipped))
    assert 0.0 < float(out.decision.scale) <= 1.0
    assert math.isfinite(inv) and inv >= 1.0


@given(policy=policies, grads=_tensors(any_floats))
def test_nonfinite_always_skips_when_asked(policy: Policy, grads) -> None:
    finite = all(np.all(np.isfinite(g)) for g in grads)
    assume(not finite)
    _, decision, _, new_state = _run(policy, grads)
    assert bool(decision.skip) == policy.skip_nonfinite
    assert int(new_state.counters.nonfinite) == 1


@given(grads=_tensors(any_floats))
def test_off_changes_nothing(grads) -> None:
    out, decision, _, _ = _run(Policy.from_preset("off"), grads)
    assert not bool(decision.skip)
    for a, b in zip(out, grads):
        np.testing.assert_array_equal(a, b)


stateful_policies = st.builds(
    Policy,
    clip_norm=st.sampled_from([0.5, 1.0, 10.0]),
    clip_value=st.sampled_from([None, 0.5]),
    adaptive=st.sampled_from([None, "zscore", "percentile"]),
    warmup=st.just(2), history=st.just(8),
    spike_skip=st.sampled_from([None, "loss", "grad_norm"]),
    spike_warmup=st.just(2), spike_window=st.just(4),
    monitor_every=st.sampled_from([0, 1, 3]), monitor_window=st.just(4),
    l2=st.sampled_from([0.0, 1e-2]),
    max_consecutive_skips=st.none(),
)


@given(policy=stateful_policies, steps=st.lists(st.tuples(_tensors(any_floats), any_floats),
                                                min_size=1, max_size=8))
def test_skipped_update_changes_only_what_each_feature_declares(policy: Policy, steps) -> None:
    """A skipped update never happened: only each feature's SKIPPABLE fields move."""
    grads0 = steps[0][0]
    state = init_state(xp, policy, n_tensors=len(grads0))
    for grads, loss in steps:
        if [g.shape for g in grads] != [g.shape for g in grads0]:
            continue
        _, decision, old, new = _run(policy, grads, state=state, loss=loss)
        if bool(decision.skip):
            for (name, module), was, now in zip(FEATURES.items(), old, new):
                for field, a, b in zip(now._fields, was, now):
                    if field not in module.SKIPPABLE:
                        np.testing.assert_array_equal(b, a, err_msg=f"{name}.{field}")
            assert int(new.counters.skips) == int(old.counters.skips) + 1
            assert int(new.counters.consecutive_skips) == int(
                old.counters.consecutive_skips) + 1
        state = new


def test_consecutive_skips_reset_after_an_applied_step() -> None:
    policy = Policy()
    state = init_state(xp, policy)
    nan = GradStats(norm=np.float32(np.nan))
    ok = GradStats(norm=np.float32(0.5))
    for stats, expected in [(nan, 1), (nan, 2), (ok, 0), (nan, 1)]:
        _, state = decide(xp, policy, state, stats)
        assert int(state.counters.consecutive_skips) == expected
    assert int(state.counters.skips) == 3 and int(state.counters.steps) == 1


def test_clip_counting_and_threshold() -> None:
    policy = Policy(clip_norm=2.0)
    state = init_state(xp, policy)
    decision, state = decide(xp, policy, state, GradStats(norm=np.float32(8.0)))
    assert bool(decision.clipped) and float(decision.scale) == pytest.approx(0.25)
    inv = sa.inverse_scale(xp, np.float32(8.0), decision.threshold, decision.clipped)
    assert float(inv) == 4.0
    decision, state = decide(xp, policy, state, GradStats(norm=np.float32(1.0)))
    assert not bool(decision.clipped)
    assert float(sa.inverse_scale(xp, np.float32(1.0), decision.threshold,
                                  decision.clipped)) == 1.0
    assert int(state.counters.norm_clips) == 1 and float(state.counters.last_norm) == 1.0


def test_loss_spike_needs_the_loss() -> None:
    policy = Policy(spike_skip="loss")
    state = init_state(xp, policy)
    with pytest.raises(ValueError, match="needs the loss"):
        decide(xp, policy, state, GradStats(norm=np.float32(1.0)))


def test_step_needs_params_for_penalty() -> None:
    policy = Policy(l2=0.1)
    with pytest.raises(ValueError, match="pass params"):
        sa.step(kernels, policy, init_state(xp, policy), [np.ones(2, np.float32)])


def test_bfloat_like_low_precision_grads_keep_their_dtype() -> None:
    policy = Policy(clip_norm=1.0)
    grads = [np.full(4, 300.0, np.float16)]
    out, _, _, _ = _run(policy, grads)
    assert out[0].dtype == np.float16
    assert float(np.linalg.norm(out[0].astype(np.float32))) == pytest.approx(1.0, rel=1e-3)
