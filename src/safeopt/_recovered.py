"""What recovery did, as :func:`safeopt.stats`, telemetry records and the diagnosis report it."""

from __future__ import annotations

from typing import Any

import numpy as np

from safeopt._features import recovery
from safeopt._features.base import Empty
from safeopt._state import State


def recovery_summary(state: State) -> dict[str, Any]:
    """The recovery entries of :func:`stats` and of telemetry records (none without ``recover``).

    ``last_recovery`` is ``{"at": update index, "restored_to": update index
    of the snapshot, "cause": [what fired, in words]}`` or ``None``;
    ``divergence_cause`` says what fired at the latest divergence, recovered
    from or not (empty before any).
    """
    rec = state.recovery
    if isinstance(rec, Empty):
        return {}
    at = int(np.asarray(rec.last_at))
    cause = recovery.cause_names(int(np.asarray(rec.last_cause)))
    return {
        "recoveries": int(np.asarray(rec.recoveries)),
        "recovery_exhausted": bool(np.asarray(rec.exhausted)),
        "rolled_back": int(np.asarray(rec.rolled_back)),
        "last_recovery": None if at < 0 else {
            "at": at, "restored_to": int(np.asarray(rec.last_from)), "cause": cause},
        "divergence_cause": cause,
    }
