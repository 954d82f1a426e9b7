"""The monitor's loss statistics: signs (b) an unstable loss and (e) no traction.

Both read applied updates that come with a finite loss. (b) fires on
outliers or on divergence: the robust z-score of each update-to-update loss
change against the last ``monitor_window`` changes, and the fraction of
outliers over that window (above :data:`LOSS_OUTLIER_FRAC`); or the
smoothed loss risen from its best by more than half of the progress made
from the first loss plus the best's own size (:func:`diverging`). (e) fires
when the smoothed loss has not improved by ``LOSS_PROGRESS`` for
``monitor_window`` updates and is still above half of the first loss.

References:
  Iglewicz & Hoaglin (1993), How to Detect and Handle Outliers (the
  modified z-score ``0.6745 (x - median) / MAD``, an outlier above 3.5).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from safeopt._features.base import count_if, pick, ring_push
from safeopt._xp import Array, Namespace

if TYPE_CHECKING:
    from safeopt._features.monitor import MonitorState
    from safeopt._policy import Policy

#: |robust z| of a loss change that counts as an outlier (Iglewicz & Hoaglin's 3.5).
LOSS_Z = 3.5
#: Fraction (EMA over ``monitor_window``) of outlying loss changes that fires sign (b).
LOSS_OUTLIER_FRAC = 0.2
#: Relative improvement of the smoothed loss that counts as progress (sign (e)).
LOSS_PROGRESS = 0.01
#: Sign (e) needs the best smoothed loss still above this fraction of the first loss.
TRACTION_FRACTION = 0.5
_TINY = 1e-12


def min_updates(policy: Policy) -> int:
    """Applied updates a windowed statistic needs before its sign may fire."""
    return max(2, policy.monitor_window // 5)


def update(xp: Namespace, policy: Policy, m: MonitorState, prev: Array, loss: Array | None,
           apply: Array, t: Array) -> tuple[dict[str, Array], Array | None, Array | None]:
    """``(changes, fire_b, fire_e)``; ``prev`` is the loss of the last applied update."""
    if loss is None:
        return {}, None, None
    window = policy.monitor_window
    take = xp.logical_and(apply, xp.isfinite(loss))
    had_prev = xp.isfinite(prev)
    delta = loss - xp.where(had_prev, prev, loss)
    push = xp.logical_and(take, had_prev)
    floor = 1e-4 * xp.abs(xp.where(had_prev, prev, 0.0)) + _TINY
    z = _robust_z(xp, m.loss_deltas, m.loss_count, delta, floor)
    counted = xp.logical_and(push, m.loss_count >= min_updates(policy))
    outlier = xp.astype(xp.abs(z) > LOSS_Z, xp.float32)
    frac = m.loss_outlier_frac + (outlier - m.loss_outlier_frac) / window
    frac = xp.where(counted, frac, m.loss_outlier_frac)
    unstable = xp.logical_and(counted, frac > LOSS_OUTLIER_FRAC)

    seen_before = xp.isfinite(m.loss_first)
    ema = xp.where(seen_before, m.loss_ema + (5.0 / window) * (loss - m.loss_ema), loss)
    ema = xp.where(take, ema, m.loss_ema)
    first = xp.where(xp.logical_and(take, xp.logical_not(seen_before)), loss, m.loss_first)
    best = m.loss_best
    margin = LOSS_PROGRESS * xp.abs(xp.where(xp.isfinite(best), best, 0.0))
    improved = xp.logical_and(take, ema < best - margin)
    new_best = xp.where(improved, ema, best)
    best_step = xp.where(improved, t, m.loss_best_step)
    peak = xp.where(improved, ema, xp.where(take, xp.maximum(m.loss_peak, ema), m.loss_peak))
    warm = xp.logical_and(take, m.loss_count >= min_updates(policy))
    fire_b = xp.logical_or(unstable, xp.logical_and(warm, diverging(xp, ema, new_best, first)))
    stuck = xp.logical_and(t - best_step >= window,
                           new_best - first > -TRACTION_FRACTION * xp.abs(first))
    changes = {
        "loss_deltas": xp.where(push, ring_push(xp, m.loss_deltas, m.loss_count, delta),
                                m.loss_deltas),
        "loss_count": count_if(xp, m.loss_count, push),
        "loss_outlier_frac": frac,
        "loss_ema": ema,
        "loss_first": first,
        "loss_best": new_best,
        "loss_best_step": best_step,
        "loss_peak": peak,
    }
    return changes, fire_b, xp.logical_and(take, stuck)


def diverging(xp: Namespace, ema: Array, best: Array, first: Array) -> Array:
    """Whether the smoothed loss has risen from its best by more than it should.

    By more than half of the progress made (``first - best``) plus the best's
    own size: a non-negative loss that gave back over half of its progress
    and doubled its best, or more than doubled without progress. Scale-free:
    a loss times any factor fires alike.
    """
    finite = xp.logical_and(xp.isfinite(best), xp.isfinite(first))
    allowed = 0.5 * xp.abs(first - best) + xp.abs(best)
    return xp.logical_and(finite, ema - best > xp.where(finite, allowed, 0.0))


def _robust_z(xp: Namespace, ring: Array, count: Array, value: Array, floor: Array) -> Array:
    """Modified z-score ``0.6745 (x - median) / MAD`` of ``value`` against the ring."""
    n = xp.minimum(count, ring.shape[0])
    med = xp.where(n > 0, _masked_median(xp, ring, n), 0.0)
    mad = xp.where(n > 0, _masked_median(xp, xp.abs(ring - med), n), 0.0)
    return 0.6745 * (value - med) / xp.maximum(mad, floor)


def _masked_median(xp: Namespace, ring: Array, n: Array) -> Array:
    size = ring.shape[0]
    ordered = xp.sort(xp.where(xp.arange(size, like=ring) < n, ring, math.inf))
    last = xp.maximum(n - 1, 0)
    lo = last // 2
    return 0.5 * (pick(xp, ordered, lo) + pick(xp, ordered, last - lo))
