"""The diagnostic monitor: the statistics behind the signs of exploding gradients.

Every update, on the device and branch-free, it updates the evidence of five
signs (:data:`SIGNS`): (a) NaN/Inf loss or gradients, (b) an unstable or
diverging loss, (c) weights growing fast or going NaN/Inf, (d) a gradient
norm that grew tenfold over its lowest level (and is above 1.0), (e) a loss
that gets no traction. :mod:`safeopt._diagnose` reads them when asked and
weighs them into a verdict. ``monitor_every = 0`` turns the monitor off (the
first NaN/Inf update is still counted, in :mod:`~safeopt._features.counters`).

Windowed statistics take in applied updates with finite values only (a
NaN/Inf gradient norm leaves a layer's statistics as they were); a skipped
update may change only the sign bookkeeping (:data:`SKIPPABLE`), since (a)
and (c) can fire on an update that is skipped. Signs (b) and (e) are in
:mod:`safeopt._features.monitor_loss`.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063
  Brownlee (2017), A Gentle Introduction to Exploding Gradients in Neural
  Networks (the signs and the remedies).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from safeopt._features import monitor_loss
from safeopt._features.base import EMPTY, Empty, count_if, filled
from safeopt._features.monitor_loss import min_updates
from safeopt._xp import Array, Namespace

if TYPE_CHECKING:
    from safeopt._features.counters import Counters
    from safeopt._pipeline import GradStats, Observed
    from safeopt._policy import Policy

#: The signs of exploding gradients the monitor tracks, in ``sign_*`` order.
SIGNS: tuple[str, ...] = ("nonfinite", "loss_unstable", "weight_growth", "grad_growth",
                          "no_traction")
#: Fraction (EMA over ``monitor_window``) of updates with a norm above 1 that makes a layer hot.
LAYER_OVER_FRAC = 0.5
#: Growth of the gradient norm (short EMA over the lowest window mean) that fires sign (d).
GRAD_GROWTH = 10.0
#: Sign (d) also needs the short EMA of the gradient norm above this.
GRAD_FLOOR = 1.0
_TINY = 1e-12


class MonitorState(NamedTuple):
    """Per layer (``n_tensors``), per sign (5), and gradient, loss and weight statistics."""

    layer_count: Array  # int32 (n,): applied updates in which the layer had a finite gradient
    layer_norm_ema: Array  # float32 (n,): EMA of its raw gradient norm
    layer_norm_low: Array  # float32 (n,): lowest layer_norm_ema once warmed up (inf before)
    layer_over_frac: Array  # float32 (n,): EMA of 1[raw gradient norm > 1]
    layer_over_since: Array  # int32 (n,): update index since which over_frac > 0.5, or -1
    sign_since: Array  # int32 (5,): update index the latest episode began, or -1
    sign_last: Array  # int32 (5,): update index it last fired, or -1
    sign_count: Array  # int32 (5,): updates on which it fired
    grad_count: Array  # int32: applied updates with a finite global gradient norm
    grad_mean: Array  # float32: EMA of the raw global norm, spikes capped (monitor_window)
    grad_fast: Array  # float32: EMA of the raw global norm, capped (monitor_window / 5)
    grad_low: Array  # float32: lowest grad_mean once warmed up (inf before)
    grad_peak: Array  # float32: largest raw global norm seen once warmed up (0 before)
    loss_deltas: Array  # float32 (monitor_window,): ring of update-to-update loss changes
    loss_count: Array  # int32: loss changes written into loss_deltas
    loss_outlier_frac: Array  # float32: EMA of 1[|robust z of the loss change| > LOSS_Z]
    loss_ema: Array  # float32: EMA of the loss (time constant monitor_window / 5)
    loss_first: Array  # float32: first loss seen (NaN before)
    loss_best: Array  # float32: lowest loss_ema so far (inf before)
    loss_best_step: Array  # int32: update index loss_best last improved, or -1
    loss_peak: Array  # float32: highest loss_ema since loss_best last improved (-inf before)
    wnorm_last: Array  # float32: last weight norm observed (NaN before)
    wnorm_last_step: Array  # int32: update index of that observation, or -1
    wnorm_rate: Array  # float32: EMA of the relative weight-norm growth per update


SKIPPABLE = frozenset({"sign_since", "sign_last", "sign_count"})

_INITIAL: dict[str, float] = {
    "layer_norm_low": math.inf, "layer_over_since": -1, "sign_since": -1, "sign_last": -1,
    "grad_low": math.inf, "loss_first": math.nan, "loss_best": math.inf,
    "loss_best_step": -1, "loss_peak": -math.inf, "wnorm_last": math.nan,
    "wnorm_last_step": -1, "wnorm_rate": math.nan,
}
_INTS = frozenset({"layer_count", "layer_over_since", "sign_since", "sign_last", "sign_count",
                   "grad_count", "loss_count", "loss_best_step", "wnorm_last_step"})


def init(xp: Namespace, policy: Policy, n_tensors: int,
         like: Array | None) -> MonitorState | Empty:
    """The monitor's state (:class:`Empty` with ``monitor_every = 0``)."""
    if policy.monitor_every <= 0:
        return EMPTY
    sizes = {"loss_deltas": policy.monitor_window}
    for name in ("sign_since", "sign_last", "sign_count"):
        sizes[name] = len(SIGNS)
    for name in MonitorState._fields:
        if name.startswith("layer_"):
            sizes[name] = n_tensors
    return MonitorState(**{
        name: filled(xp, (sizes[name],) if name in sizes else (), _INITIAL.get(name, 0),
                     xp.int32 if name in _INTS else xp.float32, like)
        for name in MonitorState._fields})


def update(xp: Namespace, policy: Policy, m: MonitorState | Empty, c: Counters,
           seen: Observed, stats: GradStats, apply: Array) -> MonitorState | Empty:
    """The monitor after this update (``c``: the counters before it)."""
    if isinstance(m, Empty):
        return m
    t = seen.t
    layers = _layers(xp, policy, m, stats, apply, t)
    grad, fire_d = _grad(xp, policy, m, seen.raw_norm, apply)
    loss, fire_b, fire_e = monitor_loss.update(xp, policy, m, c.last_loss, seen.loss, apply, t)
    weights, fire_c = _weights(xp, policy, m, stats, apply, t)
    never = t < 0  # a device-resident False, so that stack sees one device
    fired = [xp.logical_not(seen.finite), fire_b, fire_c, fire_d, fire_e]
    fires = xp.stack([never if f is None else xp.logical_or(never, f) for f in fired])
    return m._replace(**layers, **grad, **loss, **weights, **_signs(xp, policy, m, fires, t))


def _signs(xp: Namespace, policy: Policy, m: MonitorState, fires: Array,
           t: Array) -> dict[str, Array]:
    """Episode bookkeeping: a sign silent for ``monitor_window`` updates starts anew."""
    fresh = xp.logical_or(m.sign_last < 0, t - m.sign_last > policy.monitor_window)
    return {
        "sign_since": xp.where(xp.logical_and(fires, fresh), t, m.sign_since),
        "sign_last": xp.where(fires, t, m.sign_last),
        "sign_count": count_if(xp, m.sign_count, fires),
    }


def _window_mean(xp: Namespace, policy: Policy, mean: Array, count: Array,
                 value: Array) -> Array:
    """A running mean over the first ``monitor_window`` values, an EMA afterwards.

    ``count`` counts the values before this one; the first values then do
    not weigh more than the others.
    """
    beta = 1.0 / xp.astype(xp.minimum(count + 1, policy.monitor_window), xp.float32)
    return mean + beta * (value - mean)


def _layers(xp: Namespace, policy: Policy, m: MonitorState, stats: GradStats, apply: Array,
            t: Array) -> dict[str, Array]:
    """Per layer: window means of the raw gradient norm and of ``norm > 1``, the lowest mean.

    Layers without a gradient, or with a NaN/Inf gradient norm, in this update
    keep their statistics.
    """
    if stats.tensor_norms is None or m.layer_norm_ema.shape[0] == 0:
        return {}
    norms = xp.astype(stats.tensor_norms, xp.float32)
    take = xp.logical_and(xp.isfinite(norms), apply)
    if stats.present is not None:
        take = xp.logical_and(take, stats.present)
    safe = xp.where(take, norms, 0.0)
    ema = xp.where(take, _window_mean(xp, policy, m.layer_norm_ema, m.layer_count, safe),
                   m.layer_norm_ema)
    over = xp.astype(safe > 1.0, xp.float32)
    frac = xp.where(take, _window_mean(xp, policy, m.layer_over_frac, m.layer_count, over),
                    m.layer_over_frac)
    count = count_if(xp, m.layer_count, take)
    warm = count >= min_updates(policy)
    low = xp.where(xp.logical_and(take, warm), xp.minimum(m.layer_norm_low, ema),
                   m.layer_norm_low)
    hot = xp.logical_and(frac > LAYER_OVER_FRAC, warm)
    since = xp.where(hot, xp.where(m.layer_over_since < 0, t, m.layer_over_since), -1)
    return {"layer_count": count, "layer_norm_ema": ema, "layer_norm_low": low,
            "layer_over_frac": frac, "layer_over_since": since}


def _grad(xp: Namespace, policy: Policy, m: MonitorState, raw_norm: Array,
          apply: Array) -> tuple[dict[str, Array], Array]:
    """Sign (d): the global gradient norm's short EMA over its lowest window mean.

    Fires when the short EMA (window ``monitor_window / 5``) is at least
    :data:`GRAD_GROWTH` times the lowest window mean seen once warmed up
    (``min_updates`` applied updates) and above :data:`GRAD_FLOOR`. Both
    EMAs take each norm capped at a multiple of the window mean (the short
    one at ``GRAD_GROWTH ** 2`` times, the window mean itself at
    ``GRAD_GROWTH`` times): one spike fires the sign, as a lasting rise
    does, but does not hold the EMAs up for hundreds of updates.
    """
    norm = xp.astype(raw_norm, xp.float32)
    take = xp.logical_and(apply, xp.isfinite(norm))
    safe = xp.where(take, norm, 0.0)
    known = m.grad_mean > 0.0
    capped = xp.where(known, xp.minimum(safe, GRAD_GROWTH * m.grad_mean), safe)
    mean = _window_mean(xp, policy, m.grad_mean, m.grad_count, capped)
    spike = xp.where(known, xp.minimum(safe, GRAD_GROWTH ** 2 * m.grad_mean), safe)
    alpha = 5.0 / policy.monitor_window
    fast = xp.where(m.grad_count == 0, spike, m.grad_fast + alpha * (spike - m.grad_fast))
    count = count_if(xp, m.grad_count, take)
    warm = xp.logical_and(take, count >= min_updates(policy))
    low = xp.where(warm, xp.minimum(m.grad_low, mean), m.grad_low)
    ratio = fast / xp.maximum(low, _TINY)
    peak = xp.where(warm, xp.maximum(m.grad_peak, safe), m.grad_peak)
    fire = xp.logical_and(warm, xp.logical_and(ratio >= GRAD_GROWTH, fast > GRAD_FLOOR))
    return ({"grad_count": count, "grad_mean": xp.where(take, mean, m.grad_mean),
             "grad_fast": xp.where(take, fast, m.grad_fast), "grad_low": low,
             "grad_peak": peak}, fire)


def _weights(xp: Namespace, policy: Policy, m: MonitorState, stats: GradStats, apply: Array,
             t: Array) -> tuple[dict[str, Any], Array | None]:
    """Sign (c): the weight-norm growth rate (EMA over ``monitor_window`` updates), or NaN.

    The weight norm is gathered on monitor updates (``stats.weight_due``);
    a NaN/Inf weight norm fires the sign even on a skipped update.
    """
    if stats.weight_norm is None:
        return {}, None
    obs = xp.astype(stats.weight_norm, xp.float32)
    due = stats.weight_due
    ok = xp.isfinite(obs)
    bad = xp.logical_not(ok)
    if due is not True:
        ok, bad = xp.logical_and(due, ok), xp.logical_and(due, bad)
    take = xp.logical_and(ok, apply)
    known = m.wnorm_last_step >= 0
    gap = xp.astype(xp.maximum(t - m.wnorm_last_step, 1), xp.float32)
    growth = (obs - m.wnorm_last) / (xp.maximum(m.wnorm_last, _TINY) * gap)
    beta = xp.minimum(gap / policy.monitor_window, 1.0)
    had_rate = xp.isfinite(m.wnorm_rate)
    rate = xp.where(had_rate, m.wnorm_rate + beta * (growth - m.wnorm_rate), growth)
    grows = xp.logical_and(take, known)
    rate = xp.where(grows, rate, m.wnorm_rate)
    fast = xp.logical_and(grows, rate > 1.0 / policy.monitor_window)
    return ({"wnorm_last": xp.where(take, obs, m.wnorm_last),
             "wnorm_last_step": xp.where(take, t, m.wnorm_last_step),
             "wnorm_rate": rate}, xp.logical_or(fast, bad))
