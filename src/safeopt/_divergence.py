"""The divergence check: too many skipped updates in a row stop the run, naming the cause."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from safeopt._diagnose import diagnose
from safeopt._diagnosis import Diagnosis
from safeopt._errors import DivergenceError
from safeopt._policy import Policy


def raise_if_diverged(policy: Policy, counters: Mapping[str, Any], obj: Any = None) -> None:
    """Raises :class:`DivergenceError` when ``counters`` show too many skips in a row.

    Also raises when a divergence came after the last recovery allowed
    (``counters["recovery_exhausted"]``), as compiled adapters report it.

    Args:
      policy: The policy in force (``max_consecutive_skips``).
      counters: At least ``consecutive_skips``, and ``streak_nonfinite`` (how
        many of them carried NaN/Inf; the others were spikes) when known.
      obj: The wrapped optimizer or state, to attach its diagnosis.
    """
    if counters.get("recovery_exhausted"):
        raise_recovery_exhausted(policy, counters, obj)
    limit = policy.max_consecutive_skips
    streak = int(counters["consecutive_skips"])
    if limit is None or streak < limit:
        return
    if policy.recover and int(counters.get("recoveries", 0)) < policy.max_recoveries:
        return  # the adapter restores the last snapshot instead
    nonfinite = int(counters.get("streak_nonfinite", streak))
    raise DivergenceError(
        f"safeopt skipped {streak} consecutive updates (max_consecutive_skips={limit}): "
        f"{cause(streak, nonfinite, policy)}{_recoveries(policy, counters)} Training stops "
        "here instead of going on with garbage.", diagnosis=_diagnosis_of(obj),
        stats=dict(counters))


def raise_recovery_exhausted(policy: Policy, counters: Mapping[str, Any],
                             obj: Any = None) -> None:
    """Raises :class:`DivergenceError`: the run diverged once more than ``max_recoveries``.

    Args:
      policy: The policy in force (``recover`` is on).
      counters: :func:`safeopt.stats` of the run (``recoveries``, ``last_recovery``).
      obj: The wrapped optimizer or state, to attach its diagnosis.
    """
    n = int(counters.get("recoveries", 0))
    fired = "; ".join(counters.get("divergence_cause") or ()) or "the run diverged"
    raise DivergenceError(
        f"safeopt's run diverged again after {n} recover{'y' if n == 1 else 'ies'} "
        f"(max_recoveries={policy.max_recoveries}): {fired}"
        f"{_recoveries(policy, counters)} Restoring "
        "once more would repeat what did not work: lower the learning rate, or look for what "
        "changed in the data.", diagnosis=_diagnosis_of(obj), stats=dict(counters))


def _recoveries(policy: Policy, counters: Mapping[str, Any]) -> str:
    n = int(counters.get("recoveries", 0))
    if not policy.recover or not n:
        return "."
    last = counters.get("last_recovery") or {}
    return (f". Each restored the last good snapshot and backed the learning rate off to "
            f"{policy.recover_lr_factor:g}x; the last, at update {last.get('at')}, went back "
            f"to update {last.get('restored_to')}; {int(counters.get('rolled_back', 0))} "
            "updates were rolled back in all.")


def cause(streak: int, nonfinite: int, policy: Policy) -> str:
    """The cause of a streak of skips, in words, with what to do about it."""
    spikes = streak - nonfinite
    if spikes <= 0:
        return ("every one of them carried NaN/Inf gradients or loss. Lower the learning "
                "rate, check the data and the loss for NaN, or raise max_consecutive_skips.")
    watched = "loss" if policy.spike_skip == "loss" else "gradient norm"
    if nonfinite == 0:
        return (f"every one of them was a {watched} spike (more than spike_k={policy.spike_k:g} "
                f"standard deviations above the last {policy.spike_window} values). Raise "
                "spike_k, or look for what changed in the data or the learning rate.")
    return (f"{nonfinite} carried NaN/Inf gradients or loss and {spikes} were {watched} "
            f"spikes. Lower the learning rate and check the data for NaN and outliers.")


def _diagnosis_of(obj: Any) -> Diagnosis | None:
    if obj is None:
        return None
    try:
        return diagnose(obj)
    except Exception as err:  # the error must still be raised
        warnings.warn(f"safeopt could not diagnose the run: {err}", RuntimeWarning, stacklevel=3)
        return None
