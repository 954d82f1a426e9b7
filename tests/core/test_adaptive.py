"""Adaptive policies against step-by-step references written here in plain Python.

ZClip (Kumar et al., 2025; the ``zclip`` package), AutoClip (Seetharaman et
al., 2020), loss / grad-norm spike skipping (OLMo 2, Levanter, OLMo-core)
and the adaptive weight penalty. Each reference is a plain loop over Python
floats; skipped updates must leave the adaptive statistics exactly as they
were, while the spike window takes in every finite value, skipped or not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import safeopt
import safeopt.adapter as sa
from safeopt import Policy
from safeopt.adapter import GradStats, decide, init_state

xp = sa.namespace_by_name("numpy")
kernels = sa.Kernels(xp)


def protect(policy: Policy, state: sa.State, grads: list, params: list) -> sa.Step:
    with np.errstate(all="ignore"):
        return sa.step(kernels, policy, state, grads, params)


def _norms(n: int, seed: int, spikes: dict[int, float]) -> list[float]:
    rng = np.random.default_rng(seed)
    values = [float(v) for v in np.abs(rng.normal(1.0, 0.2, n)).astype(np.float32)]
    for i, v in spikes.items():
        values[i] = v
    return values


class ZClipReference:
    """ZClip's ``step``: "zscore" mode, "adaptive_scaling", ``max_grad_norm`` = cap."""

    def __init__(self, alpha: float, z_thresh: float, warmup: int, cap: float) -> None:
        self.alpha, self.z_thresh, self.warmup, self.cap = alpha, z_thresh, warmup, cap
        self.buffer: list[float] = []
        self.mean = self.var = 0.0
        self.initialized = False

    def step(self, norm: float) -> float:
        """Returns the effective clip threshold for ``norm``."""
        if not self.initialized:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized = True
            return self.cap
        std = self.var ** 0.5
        z = (norm - self.mean) / (std + 1e-6)
        clip_val = None
        if z > self.z_thresh:
            clip_val = self.mean + (self.z_thresh * std) / (z / self.z_thresh)
        effective = min(clip_val if clip_val is not None else norm, self.cap)
        taken = clip_val if clip_val is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * taken
        self.var = self.alpha * self.var + (1 - self.alpha) * (taken - self.mean) ** 2
        return effective


def _scale(norm: float, threshold: float) -> float:
    return threshold / norm if norm > threshold else 1.0


def _run(policy: Policy, values: list[float], loss: bool = False):
    state = init_state(xp, policy)
    out = []
    for v in values:
        v32 = np.float32(v)
        stats = GradStats(norm=v32, loss=v32) if loss else GradStats(norm=v32)
        decision, state = decide(xp, policy, state, stats)
        out.append(decision)
    return out, state


@pytest.mark.parametrize("cap", [1.5, 100.0])
def test_zscore_matches_zclip_step_by_step(cap: float) -> None:
    policy = Policy(clip_norm=cap, adaptive="zscore", warmup=10)
    values = _norms(120, seed=0, spikes={30: 6.0, 31: 9.0, 60: 4.0, 90: 50.0})
    decisions, state = _run(policy, values)
    ref = ZClipReference(alpha=0.97, z_thresh=2.5, warmup=10, cap=cap)
    for i, (v, d) in enumerate(zip(values, decisions)):
        expected = _scale(v, ref.step(v))
        assert float(d.scale) == pytest.approx(expected, rel=1e-4), i
    assert float(state.adaptive.mean) == pytest.approx(ref.mean, rel=1e-4)
    assert float(state.adaptive.var) == pytest.approx(ref.var, rel=1e-3)
    assert int(state.counters.norm_clips) == sum(1 for d in decisions if bool(d.clipped))
    assert any(bool(d.clipped) for d in decisions[10:])


def test_zscore_warmup_statistics_are_the_buffer_mean_and_variance() -> None:
    policy = Policy(clip_norm=10.0, adaptive="zscore", warmup=7)
    values = _norms(7, seed=1, spikes={})
    _, state = _run(policy, values)
    assert float(state.adaptive.mean) == pytest.approx(np.mean(values), rel=1e-5)
    assert float(state.adaptive.var) == pytest.approx(np.var(values), rel=1e-4)


def test_zscore_reciprocal_rule_clips_harder_the_larger_the_outlier() -> None:
    policy = Policy(clip_norm=1e6, adaptive="zscore", warmup=25)
    base = _norms(25, seed=2, spikes={})
    thresholds = []
    for spike in (5.0, 50.0):
        decisions, _ = _run(policy, [*base, spike])
        thresholds.append(float(decisions[-1].threshold))
    assert thresholds[1] < thresholds[0] < 5.0


def percentile_reference(values: list[float], p: float, history: int, warmup: int,
                         cap: float) -> list[float]:
    seen: list[float] = []
    thresholds = []
    for v in values:
        n_before = len(seen)
        seen.append(v)
        window = seen[-history:]
        threshold = cap if n_before < warmup else min(float(np.percentile(window, p)), cap)
        thresholds.append(threshold)
    return thresholds


@pytest.mark.parametrize(("history", "warmup"), [(16, 4), (1024, 25)])
def test_percentile_matches_autoclip_step_by_step(history: int, warmup: int) -> None:
    policy = Policy(clip_norm=5.0, adaptive="percentile", history=history, warmup=warmup)
    values = _norms(80, seed=3, spikes={40: 30.0})
    decisions, _ = _run(policy, values)
    expected = percentile_reference(values, 10.0, history, warmup, 5.0)
    for i, (v, d, thr) in enumerate(zip(values, decisions, expected)):
        assert float(d.scale) == pytest.approx(_scale(v, thr), rel=1e-4), i


@pytest.mark.parametrize("policy", [
    Policy(clip_norm=2.0, adaptive="zscore", warmup=5),
    Policy(clip_norm=2.0, adaptive="percentile", history=8, warmup=3),
    Policy(spike_skip="grad_norm", spike_window=8, spike_warmup=4),
])
def test_skipped_updates_do_not_touch_adaptive_statistics(policy: Policy) -> None:
    clean = _norms(40, seed=4, spikes={})
    with_nan = list(clean)  # NaN updates are skipped and never enter any statistic
    for i in (3, 11, 12, 30):
        with_nan.insert(i, math.nan)
    d_clean, s_clean = _run(policy, clean)
    d_nan, s_nan = _run(policy, with_nan)
    kept = [d for d, v in zip(d_nan, with_nan) if not math.isnan(v)]
    assert [float(d.scale) for d in kept] == [float(d.scale) for d in d_clean]
    assert [bool(d.skip) for d in kept] == [bool(d.skip) for d in d_clean]
    for part in ("adaptive", "spike"):
        for a, b in zip(getattr(s_nan, part), getattr(s_clean, part)):
            np.testing.assert_array_equal(a, b, part)
    for name in ("steps", "threshold", "norm_clips", "last_norm"):
        np.testing.assert_array_equal(getattr(s_nan.counters, name),
                                      getattr(s_clean.counters, name), name)
    assert int(s_nan.counters.skips) == int(s_clean.counters.skips) + 4


def spike_reference(values: list[float], window: int, k: float, warmup: int) -> list[bool]:
    """Levanter's skip-step rule, as its ``SkipStepConfig.wrap`` writes it.

    Against the values seen before (the last ``window``; population mean and
    standard deviation, the deviation floored at 1e-6), once ``warmup``
    values were seen, a value above ``mean + k * std`` is skipped; then the
    value enters the history whatever was decided (OLMo-core's
    ``SkipStepOptimizer`` too appends every loss, skipped or not). NaN is
    never written (Levanter's ``nanmean`` ignores it).
    """
    history: list[float] = []
    skips = []
    for v in values:
        spike = False
        if len(history) >= warmup:
            recent = history[-window:]
            mean = sum(recent) / len(recent)
            std = (sum((x - mean) ** 2 for x in recent) / len(recent)) ** 0.5
            spike = v > mean + k * max(std, 1e-6)
        skips.append(spike)
        if math.isfinite(v):
            history.append(v)
    return skips


@pytest.mark.parametrize("on", ["loss", "grad_norm"])
def test_spike_skip_matches_reference(on: str) -> None:
    policy = Policy(clip_norm=None, spike_skip=on, spike_window=16, spike_k=3.0, spike_warmup=8)
    values = _norms(100, seed=5, spikes={20: 5.0, 21: 4.0, 50: 2.5, 70: 9.0})
    decisions, state = _run(policy, values, loss=True)
    expected = spike_reference(values, 16, 3.0, 8)
    assert [bool(d.skip) for d in decisions] == expected
    assert int(state.counters.spikes) == sum(expected) >= 3


@pytest.mark.parametrize(("window", "k", "shift"), [(16, 3.0, 5.0), (128, 6.0, 5.0),
                                                    (32, 6.0, 100.0)])
def test_a_lasting_level_shift_becomes_the_new_baseline(window: int, k: float,
                                                         shift: float) -> None:
    """After the loss settles at a new level, updates are applied again within the window."""
    policy = Policy(clip_norm=None, spike_skip="loss", spike_window=window, spike_k=k,
                    spike_warmup=window // 2, max_consecutive_skips=None)
    values = _norms(window, seed=7, spikes={}) + [shift * v for v in _norms(300, seed=8,
                                                                             spikes={})]
    decisions, _ = _run(policy, values, loss=True)
    skips = [bool(d.skip) for d in decisions]
    assert skips == spike_reference(values, window, k, window // 2)
    after = skips[window:]
    streak = longest = 0
    for skipped in after:
        streak = streak + 1 if skipped else 0
        longest = max(longest, streak)
    assert after[0] and longest < window  # skipped at first, never locked
    assert sum(after[window:]) < 0.05 * len(after[window:])  # then only real outliers


def test_divergence_names_spikes_nan_or_both() -> None:
    policy = Policy(clip_norm=None, spike_skip="loss", spike_window=8, spike_warmup=4,
                    max_consecutive_skips=3)

    def message(values: list[float]) -> str:
        _, state = _run(policy, values, loss=True)
        with pytest.raises(safeopt.DivergenceError) as err:
            sa.raise_if_diverged(policy, sa.summarize(policy, state))
        return str(err.value)

    base = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.0]
    assert "every one of them carried NaN/Inf" in message([*base, math.nan, math.nan, math.nan])
    # a spike enters the window, so the next one must be larger to be a spike too
    assert "every one of them was a loss spike" in message([*base, 50.0, 1e4, 1e7])
    mixed = message([*base, 50.0, math.nan, 1e4])
    assert "1 carried NaN/Inf" in mixed and "2 were loss spikes" in mixed


def test_spike_skip_defaults_follow_olmo_and_levanter() -> None:
    policy = Policy(spike_skip="loss")
    assert (policy.spike_window, policy.spike_k, policy.spike_warmup) == (128, 6.0, 64)
    values = _norms(200, seed=6, spikes={63: 40.0, 150: 40.0})
    decisions, _ = _run(policy, values, loss=True)
    assert [bool(d.skip) for d in decisions] == spike_reference(values, 128, 6.0, 64)
    assert not bool(decisions[63].skip) and bool(decisions[150].skip)


def test_zscore_defaults_follow_zclip() -> None:
    policy = Policy(adaptive="zscore")
    assert (policy.zscore_alpha, policy.zscore_z, policy.warmup) == (0.97, 2.5, 25)
    assert Policy(adaptive="percentile").percentile == 10.0


def test_adaptive_penalty_turns_on_above_norm_or_fast_growth() -> None:
    policy = Policy(clip_norm=None, l2=0.1, penalty_when="weights_above", weight_norm_max=2.0,
                    weight_growth_max=0.05)
    state = init_state(xp, policy, n_tensors=1)
    grads = [np.zeros(4, np.float32)]
    previous = None
    for norm in (1.0, 3.0, 1.5, 1.6, 1.61, 2.5):
        w = np.full(4, norm / 2.0, np.float32)  # ||w|| = norm
        out = protect(policy, state, grads, [w])
        state = out.state
        on = norm > 2.0 or (previous is not None and (norm - previous) / previous > 0.05)
        expected = 2 * 0.1 * w if on else np.zeros(4, np.float32)
        np.testing.assert_allclose(out.grads[0], expected, rtol=1e-6, err_msg=str(norm))
        previous = norm


def test_adaptive_penalty_ignores_weights_of_skipped_steps() -> None:
    policy = Policy(clip_norm=None, l2=0.1, penalty_when="weights_above",
                    weight_growth_max=0.05)
    state = init_state(xp, policy, n_tensors=1)
    w1 = [np.full(4, 0.5, np.float32)]
    state = protect(policy, state, [np.zeros(4, np.float32)], w1).state
    nan_grads = [np.full(4, np.nan, np.float32)]
    out = protect(policy, state, nan_grads, [np.full(4, 5.0, np.float32)])
    assert bool(out.decision.skip)
    assert float(out.state.penalty.last_weight_norm) == float(
        state.penalty.last_weight_norm) == 1.0
