"""The diagnosis from a host state: signs, layers, remedies and text (NumPy reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import safeopt.adapter as sa
from safeopt import Policy
from safeopt._diagnosis import Diagnosis
from safeopt._remedies import remedies_for
from safeopt.adapter import GradStats, decide, diagnose_state, init_state

xp = sa.namespace_by_name("numpy")
NAMES = ["embed.weight", "rnn.weight_hh_l0", "head.weight"]


def run(policy: Policy, norms, losses=None, weights=None):
    state = init_state(xp, policy, n_tensors=len(NAMES))
    for i, tn in enumerate(norms):
        tn = np.asarray(tn, np.float32)
        stats = GradStats(
            norm=np.float32(np.sqrt(np.sum(tn ** 2))), tensor_norms=tn,
            loss=None if losses is None else np.float32(losses[i]),
            weight_norm=None if weights is None or weights[i] is None else np.float32(weights[i]))
        _, state = decide(xp, policy, state, stats)
    return state


def quiet(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.abs(rng.normal(0.2, 0.05, len(NAMES))) for _ in range(n)]


POLICY = Policy(clip_norm=None, max_consecutive_skips=None)


def test_quiet_run_has_no_sign() -> None:
    n = 300
    rng = np.random.default_rng(1)
    losses = [1.0 / (1 + 0.05 * i) + 0.01 * rng.normal() for i in range(n)]
    weights = [10 * (1 + 0.0005 * i) if i % 10 == 0 else None for i in range(n)]
    diagnosis = diagnose_state(POLICY, run(POLICY, quiet(n), losses, weights), NAMES)
    assert diagnosis.signs == () and diagnosis.remedies == () and not diagnosis.exploding
    assert str(diagnosis).endswith("no sign of exploding gradients.")


def test_nan_onset_is_tracked_although_nan_steps_are_skipped() -> None:
    norms = quiet(20) + [np.array([math.nan, 0.1, 0.1])] * 4
    diagnosis = diagnose_state(POLICY, run(POLICY, norms), NAMES)
    (sign,) = diagnosis.signs
    assert (sign.letter, sign.since, sign.last, sign.count) == ("a", 20, 23, 4)
    assert sign.active and sign.data["first_nonfinite_step"] == 20
    assert diagnosis.skipped == 4 and diagnosis.applied == 20


def test_layer_sign_names_the_layers_that_stay_above_one() -> None:
    norms = [np.array([0.3, 4.0, 2.0 if i % 3 else 0.5]) for i in range(60)]
    diagnosis = diagnose_state(POLICY, run(POLICY, norms), NAMES)
    assert [s.letter for s in diagnosis.signs] == ["d"]
    assert [la.name for la in diagnosis.layers] == ["rnn.weight_hh_l0", "head.weight"]
    hot = diagnosis.layers[0]
    assert hot.over_fraction == pytest.approx(1.0) and hot.norm == pytest.approx(4.0)
    assert hot.since == 9  # monitor_window // 5 steps before the sign may fire
    assert diagnosis.remedies[0].key == "clip_norm"
    assert diagnosis.remedies[-1].key == "gated_rnn"  # a vanilla recurrent weight is named


def test_a_few_large_early_norms_do_not_make_a_layer_hot() -> None:
    norms = [np.array([5.0, 0.1, 0.1])] * 3 + quiet(57)
    assert diagnose_state(POLICY, run(POLICY, norms), NAMES).signs == ()


def test_weight_growth_and_weight_nan() -> None:
    n = 60
    weights = [10 * 1.05 ** i if i % 10 == 0 else None for i in range(n)]
    diagnosis = diagnose_state(POLICY, run(POLICY, quiet(n), weights=weights), NAMES)
    (sign,) = diagnosis.signs
    per_step = (1.05 ** 10 - 1) / 10  # relative growth between observations, per step
    assert sign.letter == "c" and sign.data["growth_per_step"] == pytest.approx(per_step, 1e-3)
    weights[-1] = math.nan
    diagnosis = diagnose_state(POLICY, run(POLICY, quiet(n), weights=weights), NAMES)
    assert diagnosis.signs[0].data["weight_nonfinite_step"] == n - 1
    assert any(r.key == "penalty" for r in diagnosis.remedies)


def test_unstable_loss_and_no_traction() -> None:
    n = 120
    rng = np.random.default_rng(2)
    calm = [1.0 + 0.01 * rng.normal() for _ in range(60)]
    wild = [1.0 + (5.0 if i % 2 else -0.5) * rng.random() for i in range(60)]
    diagnosis = diagnose_state(POLICY, run(POLICY, quiet(n), calm + wild), NAMES)
    letters = [s.letter for s in diagnosis.signs]
    assert "b" in letters and "e" in letters
    unstable = diagnosis.signs[letters.index("b")]
    assert unstable.since >= 60 and unstable.data["outlier_fraction"] > 0.2


def test_signs_become_inactive_after_a_quiet_window() -> None:
    norms = [np.array([math.nan, 0.1, 0.1]), *quiet(80)]
    diagnosis = diagnose_state(POLICY, run(POLICY, norms), NAMES)
    assert diagnosis.fired("nonfinite") and not diagnosis.exploding
    assert "not active now" in str(diagnosis)


def test_monitor_off_tracks_only_the_nan_onset() -> None:
    policy = Policy(clip_norm=None, monitor_every=0)
    norms = [np.array([9.0, 9.0, 9.0])] * 30 + [np.array([math.nan, 1.0, 1.0])]
    state = run(policy, norms)
    assert int(state.counters.first_nonfinite_step) == 30
    assert diagnose_state(policy, state, NAMES).signs == ()


def test_remedies_follow_the_practitioner_order_and_adapt_to_the_policy() -> None:
    diagnosis = diagnose_state(POLICY, run(POLICY, [np.array([math.nan, 2.0, 2.0])] * 3), NAMES)
    keys = [r.key for r in remedies_for(POLICY, diagnosis.signs, ["dense.weight"])]
    assert keys == ["clip_norm", "clip_value", "penalty", "smaller_batch", "fewer_layers",
                    "relu"]
    strict = Policy(clip_norm=1.0, clip_value=0.5, l2=1e-3, max_consecutive_skips=None)
    texts = [r.text for r in remedies_for(strict, diagnosis.signs, ["lstm.weight_hh_l0"])]
    assert texts[0].startswith("Clip by norm harder") and "harder" in texts[1]
    assert "truncate backpropagation" in texts[-1]


def test_to_dict_round_trip_and_names_fallback() -> None:
    state = run(POLICY, [np.array([3.0, 3.0, 3.0])] * 20)
    diagnosis = diagnose_state(POLICY, state, names=None)
    assert diagnosis.layers[0].name.startswith("param")
    again = Diagnosis.from_dict(diagnosis.to_dict())
    assert str(again) == str(diagnosis)
