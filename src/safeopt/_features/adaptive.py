"""Adaptive norm thresholds: ZClip's z-score (``"zscore"``) and AutoClip's percentile.

The threshold comes from the run's own history of gradient norms and is
capped by ``clip_norm``; ``clip_norm`` applies during the first ``warmup``
applied updates. The statistics take in applied updates only: a skipped
update leaves them as they were (:data:`SKIPPABLE` is empty).

References:
  Kumar, Owen, Nelson, Hakim & Patel (2025), ZClip: Adaptive Spike
  Mitigation for LLM Pre-Training. https://arxiv.org/abs/2504.02507, and its
  reference code (``zclip.ZClip``, github.com/bluorion-com/ZClip).
  Seetharaman, Wichern, Pardo & Le Roux (2020), AutoClip: Adaptive Gradient
  Clipping for Source Separation Networks. https://arxiv.org/abs/2007.14469
  (github.com/pseeth/autoclip).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

from safeopt._features.base import EMPTY, Empty, filled, pick, ring_push
from safeopt._xp import Array, Namespace

if TYPE_CHECKING:
    from safeopt._policy import Policy

_TINY = 1e-12
_ZCLIP_EPS = 1e-6  # ZClip's epsilon in the z-score denominator


class ZScoreState(NamedTuple):
    """ZClip: Welford's mean and variance during the warm-up, then ZClip's EMAs."""

    count: Array  # int32, applied updates taken in
    mean: Array  # float32
    var: Array  # float32


class PercentileState(NamedTuple):
    """AutoClip: a ring of the last ``history`` applied norms."""

    count: Array  # int32, applied updates taken in
    history: Array  # float32, (history,)


SKIPPABLE: frozenset[str] = frozenset()


def init(xp: Namespace, policy: Policy, n_tensors: int,
         like: Array | None) -> ZScoreState | PercentileState | Empty:
    """The state of ``policy.adaptive`` (:class:`Empty` for a fixed threshold)."""
    count = filled(xp, (), 0, xp.int32, like)
    if policy.adaptive == "zscore":
        return ZScoreState(count, filled(xp, (), 0.0, xp.float32, like),
                           filled(xp, (), 0.0, xp.float32, like))
    if policy.adaptive == "percentile":
        return PercentileState(count, filled(xp, (policy.history,), 0.0, xp.float32, like))
    return EMPTY


def threshold(xp: Namespace, policy: Policy, st: ZScoreState | PercentileState | Empty,
              norm: Array) -> tuple[Array, Array | None]:
    """The norm threshold in force, and the value the statistics take in (``None``: none).

    ``inf`` without norm clipping; ``clip_norm`` when the threshold is fixed
    or still warming up; the adaptive threshold capped by ``clip_norm``
    otherwise.
    """
    if policy.clip_norm is None:
        return xp.full_like(norm, math.inf, xp.float32), None
    cap = xp.full_like(norm, policy.clip_norm, xp.float32)
    if isinstance(st, ZScoreState):
        adaptive, taken_in = _zscore_threshold(xp, policy, st, norm)
        warm = st.count >= max(policy.warmup, 1)
        taken_in = xp.where(warm, taken_in, norm)  # the warm-up collects plain norms
    elif isinstance(st, PercentileState):
        adaptive, taken_in = _percentile_threshold(xp, policy, st, norm), norm
        warm = st.count >= policy.warmup
    else:
        return cap, None
    adaptive = xp.maximum(adaptive, _TINY)  # keeps the clip scale > 0
    return xp.where(warm, xp.minimum(adaptive, cap), cap), taken_in


def _zscore_threshold(xp: Namespace, policy: Policy, st: ZScoreState,
                      norm: Array) -> tuple[Array, Array]:
    """ZClip's threshold ("zscore" mode, "adaptive_scaling" clip option).

    With ``mu`` and ``sigma`` the EMA mean and standard deviation of past
    norms and ``z = (g - mu) / (sigma + 1e-6)``: when ``z > z_thres`` the
    norm is clipped to ``mu + z_thres**2 * sigma / z`` (the reciprocal rule:
    the larger the outlier, the harder it is clipped), and that clipped value
    is what the EMA takes in; otherwise the threshold is the z-score boundary
    ``mu + z_thres * (sigma + 1e-6)``, which the norm does not exceed, and the
    EMA takes in the norm itself. ``clip_norm`` caps the threshold but not
    what the EMA takes in, as ZClip's ``max_grad_norm`` does.
    """
    z_thres = policy.zscore_z
    std = xp.sqrt(xp.maximum(st.var, 0.0))
    z = (norm - st.mean) / (std + _ZCLIP_EPS)
    outlier = z > z_thres
    reciprocal = st.mean + (z_thres * z_thres) * std / xp.where(outlier, z, 1.0)
    boundary = st.mean + z_thres * (std + _ZCLIP_EPS)
    return xp.where(outlier, reciprocal, boundary), xp.where(outlier, reciprocal, norm)


def _percentile_threshold(xp: Namespace, policy: Policy, st: PercentileState,
                          norm: Array) -> Array:
    """AutoClip's ``percentile``-th percentile of the norms, this one included.

    As in AutoClip, this update's norm joins the history before the
    percentile is taken; unlike AutoClip, whose history grows without bound,
    the history is a ring of the last ``history`` applied updates. Linear
    interpolation, as ``numpy.percentile``'s default.
    """
    ring = ring_push(xp, st.history, st.count, norm)
    count = xp.minimum(st.count + 1, policy.history)
    size = ring.shape[0]
    ordered = xp.sort(xp.where(xp.arange(size, like=ring) < count, ring, math.inf))
    last = xp.maximum(count - 1, 0)
    pos = xp.astype(last, xp.float32) * (policy.percentile / 100.0)
    lo = xp.astype(pos, xp.int32)  # floor: pos >= 0
    hi = xp.minimum(lo + 1, last)
    low, high = pick(xp, ordered, lo), pick(xp, ordered, hi)
    return low + (high - low) * (pos - xp.astype(lo, xp.float32))


def update(xp: Namespace, policy: Policy, st: ZScoreState | PercentileState | Empty,
           taken_in: Array | None) -> ZScoreState | PercentileState | Empty:
    """Takes in this update's value (kept only if the update is applied).

    ``percentile``: writes the norm into the ring. ``zscore``: during the
    first ``warmup`` applied updates, Welford's running mean and population
    variance (ZClip collects ``warmup_steps`` norms and initialises its EMA
    with their mean and variance, which this equals at the end of the
    warm-up); afterwards ZClip's EMA, ``mu <- a*mu + (1-a)*g'`` then
    ``var <- a*var + (1-a)*(g' - mu)**2`` with the new ``mu``.
    """
    if taken_in is None or isinstance(st, Empty):
        return st
    count = st.count + 1
    if isinstance(st, PercentileState):
        return PercentileState(count, ring_push(xp, st.history, st.count, taken_in))
    n = xp.astype(count, xp.float32)
    delta = taken_in - st.mean
    w_mean = st.mean + delta / n
    w_var = st.var + (delta * (taken_in - w_mean) - st.var) / n
    alpha = policy.zscore_alpha
    e_mean = alpha * st.mean + (1.0 - alpha) * taken_in
    e_var = alpha * st.var + (1.0 - alpha) * (taken_in - e_mean) ** 2
    warm = st.count >= max(policy.warmup, 1)
    return ZScoreState(count, xp.where(warm, e_mean, w_mean), xp.where(warm, e_var, w_var))
