"""The conformance suite on the NumPy reference implementation."""

from __future__ import annotations

import warnings

import pytest

from safeopt.testing import CASES, assert_case, reference_step


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference(case) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        new_params, stats = reference_step(case)
    assert_case(case, new_params, stats)


def test_cases_cover_every_action() -> None:
    keys = set()
    for case in CASES:
        keys |= set(case.policy) if isinstance(case.policy, dict) else {case.policy}
    assert {"clip_norm", "norm_scope", "clip_value", "skip_nonfinite", "l1", "l2", "off"} <= keys
    assert any(c.skip for c in CASES) and any(not c.skip for c in CASES)
