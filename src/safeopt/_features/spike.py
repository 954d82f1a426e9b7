"""Spike skipping: skip an update whose loss (or gradient norm) jumps far above its recent level.

A spike is a value above ``mean + spike_k * max(std, 1e-6)`` of the last
``spike_window`` values (population standard deviation, this update's value
excluded), once ``spike_warmup`` values have been seen. Every finite value
enters the window after the decision, **skipped ones too**: a lasting change
of level (the loss settling at 5 after 1) then becomes the new baseline
within a few updates instead of locking training for good. That is why the
window is this feature's own state and a skipped update may change it
(:data:`SKIPPABLE`). NaN/Inf values never enter it (the non-finite check
skips those updates for its own reason).

References:
  OLMo Team (2024), 2 OLMo 2 Furious. https://arxiv.org/abs/2501.00656
  (skip steps whose loss or gradient norm is 6 standard deviations above
  the mean of the last 128 steps), OLMo-core's ``SkipStepOptimizer`` (every
  loss and gradient norm enters the rolling window, skipped or not), and
  Levanter's ``SkipStepConfig`` (``rolling_interval_length=128``,
  ``sigma_factor=6``, a one-sided test against the population standard
  deviation floored at 1e-6, active from ``max(2, 128 // 2)`` values; the
  value is written into the window after the decision, whatever it was).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from safeopt._features.base import EMPTY, Empty, count_if, filled, ring_push
from safeopt._xp import Array, Namespace

if TYPE_CHECKING:
    from safeopt._policy import Policy

STD_FLOOR = 1e-6  # Levanter's floor on the running standard deviation


class SpikeState(NamedTuple):
    """The window of recent values (loss or gradient norm)."""

    history: Array  # float32, (spike_window,), a ring
    count: Array  # int32, values written into the ring


SKIPPABLE = frozenset({"history", "count"})


def init(xp: Namespace, policy: Policy, n_tensors: int, like: Array | None) -> SpikeState | Empty:
    """An empty window of ``spike_window`` values (:class:`Empty` when spike skipping is off)."""
    if policy.spike_skip is None:
        return EMPTY
    return SpikeState(filled(xp, (policy.spike_window,), 0.0, xp.float32, like),
                      filled(xp, (), 0, xp.int32, like))


def watched(policy: Policy, raw_norm: Array, loss: Array | None) -> Array:
    """The value spike skipping watches: the loss or the raw gradient norm."""
    if policy.spike_skip == "grad_norm":
        return raw_norm
    if loss is None:
        raise ValueError(
            "spike_skip='loss' needs the loss: pass it to step(loss=...) / update(value=...) "
            "/ apply(..., loss=...). Received: no loss"
        )
    return loss


def is_spike(xp: Namespace, policy: Policy, st: SpikeState | Empty,
             value: Array | None) -> Array | None:
    """Whether ``value`` is a spike (``False`` while warming up; ``None`` when off)."""
    if isinstance(st, Empty) or value is None:
        return None
    mean, std = _mean_std(xp, st)
    active = st.count >= policy.spike_warmup
    return xp.logical_and(active, value > mean + policy.spike_k * xp.maximum(std, STD_FLOOR))


def _mean_std(xp: Namespace, st: SpikeState) -> tuple[Array, Array]:
    size = st.history.shape[0]
    n = xp.minimum(st.count, size)
    valid = xp.arange(size, like=st.history) < n
    denom = xp.astype(xp.maximum(n, 1), xp.float32)
    mean = xp.sum(xp.where(valid, st.history, 0.0)) / denom
    dev = xp.where(valid, st.history - mean, 0.0)
    return mean, xp.sqrt(xp.sum(dev * dev) / denom)


def update(xp: Namespace, st: SpikeState | Empty, value: Array | None) -> SpikeState | Empty:
    """Writes a finite ``value`` into the window, whether the update is applied or skipped."""
    if isinstance(st, Empty) or value is None:
        return st
    finite = xp.isfinite(value)
    ring = ring_push(xp, st.history, st.count, value)
    return SpikeState(xp.where(finite, ring, st.history), count_if(xp, st.count, finite))
