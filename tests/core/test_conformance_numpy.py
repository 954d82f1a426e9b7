"""The conformance table on the NumPy reference, and through a third-party NumPy adapter."""

from __future__ import annotations

import numpy as np
import pytest

import safeopt
from safeopt._features.scope import LOCAL
from safeopt._specs import NORM_SCOPES
from safeopt.testing import CASES, Case, Trace, check, expect, guarded, reference, snapshot

safeopt_toy = pytest.importorskip("safeopt_toy", reason="the toy plug-in distribution")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_meets_the_hand_written_expectations(case: Case) -> None:
    expect(case, reference(case))


def _run_toy(case: Case) -> Trace:
    params = case.arrays("params")
    opt = safeopt.wrap(safeopt_toy.ToySGD(params, lr=1.0), case.policy)
    trace: Trace = []
    for update in case.updates:
        for i, value in enumerate(case.set_weights(params, update)):
            params[i][...] = value
        grads = case.grads(update)
        error = guarded(lambda grads=grads, update=update: opt.step(grads, update.loss),
                        lambda: opt)
        trace.append(snapshot(opt, [p.copy() for p in params], error))
    return trace


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_third_party_numpy_adapter(case: Case) -> None:
    with np.errstate(all="ignore"):
        check(case, _run_toy(case))


def test_cases_cover_every_action_and_observable() -> None:
    keys = set()
    for case in CASES:
        keys |= set(case.policy) if isinstance(case.policy, dict) else {case.policy}
    assert {"clip_norm", "norm_scope", "clip_value", "skip_nonfinite", "l1", "l2", "off",
            "adaptive", "spike_skip", "penalty_when", "monitor_every"} <= keys
    scopes = {c.policy.get("norm_scope", "global") for c in CASES if isinstance(c.policy, dict)}
    assert scopes == set(NORM_SCOPES) == {"global", *LOCAL}  # every scope has its rows
    needs = set().union(*(c.needs for c in CASES))
    assert {"no_grad", "no_grad_sometimes", "weights", "loss"} <= needs
    assert any(c.skipped and any(c.skipped) for c in CASES)
    assert any(c.signs for c in CASES) and any(c.clipped for c in CASES)
    assert any(c.diverges_at is not None for c in CASES)
