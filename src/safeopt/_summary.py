"""What :func:`safeopt.stats` and :func:`safeopt.check` return: one schema for every framework."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from safeopt._divergence import raise_if_diverged
from safeopt._policy import Policy
from safeopt._recovered import recovery_summary
from safeopt._registry import read_state
from safeopt._state import State

#: The integer counters of :func:`stats`, from :class:`~safeopt._features.counters.Counters`.
COUNTERS = ("steps", "skips", "consecutive_skips", "streak_nonfinite", "nonfinite", "spikes",
            "norm_clips", "value_clips")
#: The float values of :func:`stats`.
VALUES = ("last_norm", "last_scale", "threshold", "last_loss", "last_weight_norm")


def summarize(policy: Policy, state: State, extra: dict[str, Any] | None = None,
              ) -> dict[str, Any]:
    """Turns a host copy of the state into the dict :func:`stats` returns (pure)."""
    c = state.counters
    out: dict[str, Any] = {name: int(np.asarray(getattr(c, name))) for name in COUNTERS}
    for name in VALUES:
        out[name] = float(np.asarray(getattr(c, name)))
    if int(np.asarray(c.loss_updates)) == 0:
        out["last_loss"] = None  # never given: absent, not NaN
    if math.isnan(out["last_weight_norm"]):
        del out["last_weight_norm"]  # never gathered (monitor off, or no update yet)
    out.update(recovery_summary(state))
    out["policy"] = "off" if policy.is_noop else "on"
    out.update(extra or {})
    out["clip_rate"] = out["norm_clips"] / out["steps"] if out["steps"] else 0.0
    out["skip_rate"] = out["skips"] / max(out["steps"] + out["skips"], 1)
    return out


def stats(obj: Any) -> dict[str, Any]:
    """safeopt's counters and statistics, as plain Python numbers.

    Reading them is the one place where a host synchronisation is allowed.

    Args:
      obj: A wrapped optimizer (torch, Keras; also through a trainer's
        optimizer wrapper such as accelerate's or Lightning's) or the state
        of a wrapped Optax transformation.

    Returns:
      A dict with ``steps`` (applied updates), ``skips``,
      ``consecutive_skips``, ``streak_nonfinite`` (of those, the NaN/Inf
      ones), ``nonfinite``, ``spikes``, ``norm_clips``, ``value_clips``,
      ``last_norm``, ``last_scale``, ``threshold``, ``last_loss`` (``None``
      when no loss was ever given), ``last_weight_norm`` (when gathered),
      ``clip_rate``, ``skip_rate``; with ``recover``, ``recoveries``,
      ``rolled_back`` (updates discarded by restores) and ``last_recovery``
      (``{"at": update index, "restored_to": update index of the snapshot}``,
      or ``None``); and adapter facts: ``framework``, ``path``, ``names``...
    """
    policy, state, extra = read_state(obj)
    return summarize(policy, state, extra)


def check(obj: Any) -> dict[str, Any]:
    """Reads the counters and raises if the run is diverging (a host boundary).

    Adapters call it where they already synchronise; in compiled training
    loops (``jax.jit``) call it yourself every few steps.

    Args:
      obj: A wrapped optimizer or the state of a wrapped Optax transformation.

    Returns:
      :func:`stats` of ``obj``.

    Raises:
      DivergenceError: ``max_consecutive_skips`` updates in a row were skipped.
    """
    policy, state, extra = read_state(obj)
    counters = summarize(policy, state, extra)
    raise_if_diverged(policy, counters, obj)
    return counters
