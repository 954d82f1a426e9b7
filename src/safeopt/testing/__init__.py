"""Test helpers shipped with safeopt: the conformance suite every adapter runs."""

from safeopt.testing.conformance import CASES, Case, assert_case, reference_step

__all__ = ["CASES", "Case", "assert_case", "reference_step"]
