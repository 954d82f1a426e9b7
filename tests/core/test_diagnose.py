"""The diagnosis from a host state: signs, verdict, layers, remedies and text (NumPy reference)."""

from __future__ import annotations

import json
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
        with np.errstate(invalid="ignore"):
            _, state = decide(xp, policy, state, stats)
    return state


def quiet(n: int, seed: int = 0, level: float = 0.2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.abs(rng.normal(level, level / 4, len(NAMES))) for _ in range(n)]


def growing(n: int, start: float = 0.5, rate: float = 1.15) -> list[np.ndarray]:
    """Quiet for 20 updates, then the recurrent weight's gradient grows ``rate`` per update."""
    return quiet(20) + [np.array([0.2, start * rate ** i, 0.3]) for i in range(n)]


POLICY = Policy(clip_norm=None, max_consecutive_skips=None)


def test_quiet_run_is_healthy() -> None:
    n = 300
    rng = np.random.default_rng(1)
    losses = [1.0 / (1 + 0.05 * i) + 0.01 * rng.normal() for i in range(n)]
    weights = [10 * (1 + 0.0005 * i) if i % 10 == 0 else None for i in range(n)]
    diagnosis = diagnose_state(POLICY, run(POLICY, quiet(n), losses, weights), NAMES)
    assert diagnosis.signs == () and diagnosis.remedies == () and not diagnosis.exploding
    assert diagnosis.verdict == "healthy"
    assert str(diagnosis).endswith("healthy, no sign of exploding gradients.")


def test_gradient_norms_above_one_that_do_not_grow_are_no_sign() -> None:
    # Brownlee's "consistently above 1.0" alone: normal for many healthy models.
    rng = np.random.default_rng(3)
    norms = [np.array([3.0, 5.0, 2.0]) * rng.uniform(0.5, 2.0, 3) for _ in range(300)]
    losses = [20.0 / (1 + 0.05 * i) for i in range(300)]
    diagnosis = diagnose_state(POLICY, run(POLICY, norms, losses), NAMES)
    assert diagnosis.verdict == "healthy" and diagnosis.remedies == (), str(diagnosis)


def test_nan_onset_is_conclusive_and_tracked_although_nan_steps_are_skipped() -> None:
    norms = quiet(20) + [np.array([math.nan, 0.1, 0.1])] * 4
    diagnosis = diagnose_state(POLICY, run(POLICY, norms), NAMES)
    (sign,) = diagnosis.signs
    assert (sign.letter, sign.since, sign.last, sign.count) == ("a", 20, 23, 4)
    assert sign.active and sign.data["first_nonfinite_step"] == 20
    assert diagnosis.skipped == 4 and diagnosis.applied == 20
    assert diagnosis.verdict == "exploding" and diagnosis.remedies[0].key == "clip_norm"
    assert diagnosis.reasons == ("the loss or gradients went NaN/Inf at update 21",)


def test_text_counts_updates_from_one_like_its_header() -> None:
    norms = quiet(20) + [np.array([math.nan, 0.1, 0.1])] * 4
    text = str(diagnose_state(POLICY, run(POLICY, norms), NAMES))
    assert text.startswith("safeopt diagnosis after 24 updates (20 applied, 4 skipped)")
    assert "since update 21, 4 update(s)" in text and "the first at update 21" in text
    assert "update 20" not in text and "updates counted from 1" in text


def test_growing_gradient_norm_alone_is_a_sign_not_a_verdict() -> None:
    diagnosis = diagnose_state(POLICY, run(POLICY, growing(40)), NAMES)
    assert [s.letter for s in diagnosis.signs] == ["d"]
    sign = diagnosis.signs[0]
    assert sign.data["growth"] >= 10.0 and sign.data["layers"] == ["rnn.weight_hh_l0"]
    assert [la.name for la in diagnosis.layers] == ["rnn.weight_hh_l0"]
    assert diagnosis.layers[0].growth >= 10.0 and diagnosis.layers[0].norm > 1.0
    assert diagnosis.verdict == "signs" and diagnosis.remedies == ()
    assert "signs seen, but nothing conclusive" in str(diagnosis)
    assert "Remedies" not in str(diagnosis)


def test_growth_below_one_is_no_sign() -> None:
    # Thirtyfold, but from 0.01 to 0.3: noise around a minimum, not an explosion.
    norms = quiet(20, level=0.005) + [np.array([0.001, 0.005 * 1.15 ** i, 0.001])
                                      for i in range(30)]
    state = run(POLICY, norms)
    assert float(state.monitor.grad_peak) > 10.0 * float(state.monitor.grad_low)
    assert not diagnose_state(POLICY, state, NAMES).fired("d")


def test_growing_gradients_with_a_diverging_loss_are_exploding() -> None:
    norms = growing(40)
    losses = [2.0 - 0.05 * i for i in range(20)] + [1.0 * 1.3 ** i for i in range(40)]
    diagnosis = diagnose_state(POLICY, run(POLICY, norms, losses), NAMES)
    assert diagnosis.fired("b") and diagnosis.fired("d")
    assert "the smoothed loss rose to" in next(s.evidence for s in diagnosis.signs
                                               if s.letter == "b")
    assert diagnosis.verdict == "exploding" and diagnosis.remedies
    (reason,) = diagnosis.reasons
    assert "the gradient norm grew x" in reason and "loss was unstable or diverging" in reason
    assert "Remedies, in the order to try them" in str(diagnosis)


def test_one_spike_fires_growth_but_does_not_hold_the_baseline_up() -> None:
    spike = np.array([0.2, 300.0, 0.3])  # ~1000 times the quiet norm
    state = run(POLICY, [*quiet(60), spike, *quiet(60, seed=1)])
    diagnosis = diagnose_state(POLICY, state, NAMES)
    (sign,) = diagnosis.signs
    assert sign.letter == "d" and sign.since == 60 and sign.count <= 3
    quiet_norm = float(np.linalg.norm([0.2, 0.2, 0.2]))
    assert float(state.monitor.grad_mean) < 1.5 * quiet_norm  # back to the quiet level
    # ... so that a later, lasting rise is still seen.
    state = run(POLICY, quiet(60) + [spike] + quiet(60, seed=1)
                + [np.array([0.2, 0.5 * 1.15 ** i, 0.3]) for i in range(40)])
    assert diagnose_state(POLICY, state, NAMES).signs[0].count > 10


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e4])
def test_a_loss_that_gives_back_over_half_its_progress_diverges_at_any_scale(scale) -> None:
    # From 10 down to 1 (the smoothed best), then back up: past 1 + 9 / 2 + 1 = 6.5 diverges.
    noise = np.random.default_rng(4).normal(0.0, 0.05, 110)
    down = list(np.linspace(10.0, 1.0, 40)) + [1.0] * 30
    for back, fires in ((7.0, True), (5.0, False)):
        losses = [scale * (v + e) for v, e in zip(down + [back] * 40, noise)]
        diagnosis = diagnose_state(POLICY, run(POLICY, quiet(110), losses), NAMES)
        assert diagnosis.fired("b") == fires, (back, scale, str(diagnosis))


def test_growing_gradients_with_growing_weights_are_exploding_without_a_loss() -> None:
    weights = [10 * 1.08 ** i for i in range(60)]
    diagnosis = diagnose_state(POLICY, run(POLICY, growing(40), weights=weights), NAMES)
    assert diagnosis.fired("c") and diagnosis.fired("d") and not diagnosis.fired("b")
    assert diagnosis.verdict == "exploding"
    assert "while the weights grew fast" in diagnosis.reasons[0]


def test_signs_far_apart_are_not_conclusive_together() -> None:
    # Weights grew fast early on, the gradient norm only much later: no overlap.
    weights = [10 * 1.1 ** min(i, 15) for i in range(200)]
    norms = quiet(160) + [np.array([0.2, 0.5 * 1.15 ** i, 0.3]) for i in range(40)]
    diagnosis = diagnose_state(POLICY, run(POLICY, norms, weights=weights), NAMES)
    assert diagnosis.fired("c") and diagnosis.fired("d")
    assert diagnosis.verdict == "signs", str(diagnosis)


def test_nan_gradient_norms_leave_the_layer_statistics_finite() -> None:
    policy = Policy(clip_norm=None, skip_nonfinite=False, max_consecutive_skips=None)
    norms = quiet(30) + [np.array([math.nan, 0.2, math.inf])] * 3 + quiet(5)
    state = run(policy, norms)
    m = state.monitor
    assert np.isfinite(m.layer_norm_ema).all() and np.isfinite(m.grad_mean)
    assert m.layer_count.tolist() == [35, 38, 35]
    diagnosis = diagnose_state(policy, state, NAMES)
    assert diagnosis.applied == 38 and diagnosis.fired("a") and diagnosis.exploding


def test_a_few_large_early_norms_do_not_make_a_sign() -> None:
    norms = [np.array([5.0, 0.1, 0.1])] * 3 + quiet(57)
    assert diagnose_state(POLICY, run(POLICY, norms), NAMES).signs == ()


def test_weight_growth_alone_is_a_sign_and_weight_nan_is_conclusive() -> None:
    n = 60
    weights = [10 * 1.05 ** i if i % 10 == 0 else None for i in range(n)]
    diagnosis = diagnose_state(POLICY, run(POLICY, quiet(n), weights=weights), NAMES)
    (sign,) = diagnosis.signs
    per_step = (1.05 ** 10 - 1) / 10  # relative growth between observations, per step
    assert sign.letter == "c" and sign.data["growth_per_step"] == pytest.approx(per_step, 1e-3)
    assert diagnosis.verdict == "signs" and diagnosis.remedies == ()
    weights[-1] = math.nan
    diagnosis = diagnose_state(POLICY, run(POLICY, quiet(n), weights=weights), NAMES)
    assert diagnosis.signs[0].data["weight_nonfinite_step"] == n - 1
    assert diagnosis.verdict == "exploding"
    assert diagnosis.reasons == (f"the weights went NaN/Inf at update {n}",)
    assert any(r.key == "penalty" for r in diagnosis.remedies)


def test_unstable_loss_and_no_traction_are_signs() -> None:
    n = 120
    rng = np.random.default_rng(2)
    calm = [1.0 + 0.01 * rng.normal() for _ in range(60)]
    wild = [1.0 + (5.0 if i % 2 else -0.5) * rng.random() for i in range(60)]
    diagnosis = diagnose_state(POLICY, run(POLICY, quiet(n), calm + wild), NAMES)
    letters = [s.letter for s in diagnosis.signs]
    assert "b" in letters and "e" in letters
    unstable = diagnosis.signs[letters.index("b")]
    assert unstable.since >= 60 and unstable.data["outlier_fraction"] > 0.2
    assert diagnosis.verdict == "signs" and diagnosis.remedies == ()


def test_signs_become_inactive_after_a_quiet_window() -> None:
    norms = [np.array([math.nan, 0.1, 0.1]), *quiet(80)]
    diagnosis = diagnose_state(POLICY, run(POLICY, norms), NAMES)
    assert diagnosis.fired("nonfinite") and diagnosis.exploding and not diagnosis.active
    text = str(diagnosis)
    assert "exploding gradients, not in the last 50 updates." in text
    assert "not active now" in text and "updates 1-1" in text


def test_monitor_off_tracks_only_the_nan_onset() -> None:
    policy = Policy(clip_norm=None, monitor_every=0)
    norms = [np.array([9.0, 9.0, 9.0])] * 30 + [np.array([math.nan, 1.0, 1.0])]
    state = run(policy, norms)
    assert int(state.counters.first_nonfinite_step) == 30
    assert diagnose_state(policy, state, NAMES).signs == ()


def test_remedies_follow_the_practitioner_order_and_adapt_to_the_policy() -> None:
    diagnosis = diagnose_state(POLICY, run(POLICY, [np.array([math.nan, 2.0, 2.0])] * 3), NAMES)
    keys = [r.key for r in remedies_for(POLICY, diagnosis.signs, ["dense.weight"])]
    assert keys == ["clip_norm", "lower_lr", "clip_value", "penalty", "smaller_batch",
                    "fewer_layers", "relu"]
    strict = Policy(clip_norm=1.0, clip_value=0.5, l2=1e-3, max_consecutive_skips=None)
    texts = [r.text for r in remedies_for(strict, diagnosis.signs, ["lstm.weight_hh_l0"])]
    assert texts[0].startswith("Clip by norm harder") and "harder" in texts[2]
    assert "truncate backpropagation" in texts[-1]


def test_clip_note_says_how_much_the_clip_did() -> None:
    policy = Policy(clip_norm=1.0, max_consecutive_skips=None)
    diagnosis = diagnose_state(policy, run(policy, quiet(60, level=20.0)), NAMES)
    assert diagnosis.verdict == "healthy" and diagnosis.clipped == 60
    assert diagnosis.grad_norm == pytest.approx(20.0 * math.sqrt(3), rel=0.2)
    text = str(diagnosis)
    assert "60 clipped" in text and "the norm clip changed 100% of the applied updates" in text


def test_to_dict_round_trip_and_names_fallback() -> None:
    state = run(POLICY, growing(40))
    diagnosis = diagnose_state(POLICY, state, names=None)
    assert diagnosis.layers[0].name == "param1"
    data = diagnosis.to_dict()
    assert data["verdict"] == "signs"
    again = Diagnosis.from_dict(data)
    assert str(again) == str(diagnosis) and again.verdict == "signs"


def test_from_dict_reads_nulls_and_older_logs() -> None:
    # What a log holds after a NaN/Inf number became null, and fields older logs lack.
    data = {"updates": 26, "applied": 26, "skipped": 0, "window": None,
            "signs": [{"key": "nonfinite", "letter": "a", "title": "NaN", "since": 24,
                       "last": 25, "count": 2, "active": True, "evidence": "went NaN",
                       "data": {"first_nonfinite_step": None}}],
            "layers": [{"name": "out.weight", "index": 4, "norm": None,
                        "over_fraction": None, "since": 9}]}
    diagnosis = Diagnosis.from_dict(data)
    assert diagnosis.verdict == "exploding" and math.isnan(diagnosis.layers[0].norm)
    text = str(diagnosis)
    assert "norm ~nan" in text and "since update 25" in text


def test_a_diagnosis_says_what_recovery_did_and_survives_json() -> None:
    from safeopt._diagnosis import Diagnosis
    from safeopt.testing.cases import STREAK

    d = Diagnosis(updates=40, applied=30, skipped=10, recoveries=2, rolled_back=12,
                  last_recovery={"at": 33, "restored_to": 30, "cause": [STREAK]},
                  recovery_exhausted=True, grad_norm=1.5, threshold=1.0)
    text = str(d)
    assert "Recovered 2 times from a snapshot (12 update(s) rolled back in all)" in text
    assert f"at update 34, went back to the snapshot before update 31: {STREAK}" in text
    assert "with no recovery left" in text
    back = Diagnosis.from_dict(json.loads(json.dumps(d.to_dict())))
    assert back == d
    assert "Recovered" not in str(Diagnosis(updates=3, applied=3, skipped=0))
