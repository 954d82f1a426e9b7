"""The counters every policy keeps: what happened, update by update.

They are what :func:`safeopt.stats` reports and what the divergence check
reads. A skipped update changes only the skip counters and the first-NaN
onsets (:data:`SKIPPABLE`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from safeopt._features.base import count_if, filled
from safeopt._xp import Array, Namespace

if TYPE_CHECKING:
    from safeopt._pipeline import Decision, GradStats, Observed
    from safeopt._policy import Policy


class Counters(NamedTuple):
    """Counters (``int32``) and the last applied update's values (``float32``).

    "Update index" is ``steps + skips`` before an update: its 0-based index
    among all updates, applied or skipped.
    """

    steps: Array  # applied updates
    skips: Array  # skipped updates, all causes
    consecutive_skips: Array  # skipped updates in a row, 0 after an applied one
    streak_nonfinite: Array  # of those, the ones that carried NaN/Inf
    nonfinite: Array  # updates that carried NaN/Inf (skipped or not)
    spikes: Array  # updates skipped as loss / grad-norm spikes
    norm_clips: Array  # applied updates that any norm clip changed
    value_clips: Array  # applied updates in which some element was clipped by value
    loss_updates: Array  # applied updates that came with a loss
    last_norm: Array  # pre-clip global norm of the last applied update
    last_scale: Array  # global norm-clip scale of the last applied update
    threshold: Array  # norm threshold in force at the last applied update
    last_clipped: Array  # 1 if a norm clip changed the last applied update, else 0
    last_loss: Array  # loss of the last applied update that had one (NaN before)
    last_weight_norm: Array  # weight norm at the last applied monitor update (NaN before)
    first_nonfinite_step: Array  # update index of the first NaN/Inf gradient or loss, or -1
    weight_nonfinite_step: Array  # update index of the first NaN/Inf weight norm, or -1


SKIPPABLE = frozenset({"skips", "consecutive_skips", "streak_nonfinite", "nonfinite", "spikes",
                       "first_nonfinite_step", "weight_nonfinite_step"})

_INITIAL: dict[str, float] = {"last_norm": math.nan, "last_scale": 1.0, "last_loss": math.nan,
                              "last_weight_norm": math.nan, "first_nonfinite_step": -1,
                              "weight_nonfinite_step": -1}
_FLOATS = frozenset({"last_norm", "last_scale", "threshold", "last_loss", "last_weight_norm"})


def init(xp: Namespace, policy: Policy, n_tensors: int, like: Array | None) -> Counters:
    """Zeros, NaN for the values not seen yet, ``clip_norm`` for the threshold."""
    values = dict(_INITIAL, threshold=math.inf if policy.clip_norm is None else policy.clip_norm)
    return Counters(**{
        name: filled(xp, (), values.get(name, 0), xp.float32 if name in _FLOATS else xp.int32,
                     like)
        for name in Counters._fields})


def update(xp: Namespace, policy: Policy, c: Counters, seen: Observed, decision: Decision,
           spike: Array, stats: GradStats) -> Counters:
    """The counters after this update (as if applied; the pipeline keeps the rest on a skip)."""
    skip = decision.skip
    apply = xp.logical_not(skip)
    bad = xp.logical_not(seen.finite)
    changes: dict[str, Any] = {
        "steps": count_if(xp, c.steps, apply),
        "skips": count_if(xp, c.skips, skip),
        "consecutive_skips": xp.where(skip, c.consecutive_skips + 1, 0 * c.consecutive_skips),
        "streak_nonfinite": xp.where(skip, count_if(xp, c.streak_nonfinite, bad),
                                     0 * c.streak_nonfinite),
        "nonfinite": count_if(xp, c.nonfinite, bad),
        "spikes": count_if(xp, c.spikes, xp.logical_and(skip, xp.logical_and(seen.finite,
                                                                              spike))),
        "norm_clips": count_if(xp, c.norm_clips, decision.clipped),
        "last_norm": seen.raw_norm,
        "last_scale": decision.scale,
        "threshold": decision.threshold,
        "last_clipped": xp.astype(decision.clipped, xp.int32),
        "first_nonfinite_step": xp.where(xp.logical_and(bad, c.first_nonfinite_step < 0),
                                         seen.t, c.first_nonfinite_step),
    }
    if policy.clip_value is not None and stats.max_abs is not None:
        over = xp.logical_and(apply, stats.max_abs > policy.clip_value)
        changes["value_clips"] = count_if(xp, c.value_clips, over)
    if seen.loss is not None:
        changes["last_loss"] = seen.loss
        changes["loss_updates"] = count_if(xp, c.loss_updates, apply)
    if stats.weight_norm is not None:
        changes.update(_weight_changes(xp, c, stats, seen.t))
    return c._replace(**changes)


def _weight_changes(xp: Namespace, c: Counters, stats: GradStats, t: Array) -> dict[str, Any]:
    """The weight norm, when gathered this update (``stats.weight_due``)."""
    wnorm = xp.astype(stats.weight_norm, xp.float32)
    due = stats.weight_due
    bad = xp.logical_and(xp.logical_not(xp.isfinite(wnorm)), c.weight_nonfinite_step < 0)
    if due is not True:
        bad = xp.logical_and(bad, due)
        wnorm = xp.where(due, wnorm, c.last_weight_norm)
    return {"last_weight_norm": wnorm,
            "weight_nonfinite_step": xp.where(bad, t, c.weight_nonfinite_step)}
