"""The conformance suite every adapter runs: :data:`CASES` and :func:`check`.

Example, for a framework whose runner turns a case into a :data:`Trace`::

    from safeopt.testing import CASES, check
    for case in CASES:
        check(case, run_in_my_framework(case))
"""

from safeopt.testing.cases import CASES, Case, Update
from safeopt.testing.conformance import (
    Snapshot,
    Trace,
    check,
    expect,
    first_line,
    guarded,
    policy_of,
    reference,
    snapshot,
)

__all__ = ["CASES", "Case", "Snapshot", "Trace", "Update", "check", "expect", "first_line",
           "guarded", "policy_of", "reference", "snapshot"]
