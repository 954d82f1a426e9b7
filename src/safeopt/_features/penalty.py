"""The L1/L2 weight penalty, always or only while the weights grow.

The penalty added to each gradient is the gradient of ``l1 * sum(|w|) +
l2 * sum(w**2)``: ``l1 * sign(w) + 2 * l2 * w``, exactly what a Keras
``L1L2`` regulariser adds through the loss. With ``penalty_when=
"weights_above"`` it applies only while the global weight norm exceeds
``weight_norm_max`` or grows faster than ``weight_growth_max`` per update
(relative), which needs the weight norm on every update. Only parameters
that have a gradient are penalised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from safeopt._features.base import EMPTY, Empty, filled
from safeopt._xp import Array, Namespace

if TYPE_CHECKING:
    from safeopt._policy import Policy

_TINY = 1e-12


class PenaltyState(NamedTuple):
    """The weight norm of the last applied update (``penalty_when="weights_above"``)."""

    last_weight_norm: Array  # float32, NaN before the first applied update


SKIPPABLE: frozenset[str] = frozenset()


def init(xp: Namespace, policy: Policy, n_tensors: int,
         like: Array | None) -> PenaltyState | Empty:
    """:class:`PenaltyState` when the penalty depends on the weights, else :class:`Empty`."""
    if not policy.needs_weight_norm:
        return EMPTY
    return PenaltyState(filled(xp, (), float("nan"), xp.float32, like))


def coefficients(xp: Namespace, policy: Policy, st: PenaltyState | Empty,
                 weight_norm: Array | None) -> tuple[Any, Any]:
    """``(l1, l2)`` for this update.

    Python floats when the penalty is unconditional (adapters skip the work
    when both are 0); with ``penalty_when="weights_above"``, float32 arrays
    that are the configured coefficients while the weights are above the
    limits, and 0 otherwise.
    """
    if isinstance(st, Empty):
        return policy.l1, policy.l2
    if weight_norm is None:
        raise ValueError("penalty_when='weights_above' needs the weight norm: pass the params")
    on = _weights_above(xp, policy, st, xp.astype(weight_norm, xp.float32))
    zero = xp.full_like(weight_norm, 0.0, xp.float32)
    return (xp.where(on, xp.full_like(weight_norm, policy.l1, xp.float32), zero),
            xp.where(on, xp.full_like(weight_norm, policy.l2, xp.float32), zero))


def _weights_above(xp: Namespace, policy: Policy, st: PenaltyState, wnorm: Array) -> Array:
    """Above ``weight_norm_max``, or growing faster than ``weight_growth_max`` (NaN: neither)."""
    tests = []
    if policy.weight_norm_max is not None:
        tests.append(wnorm > policy.weight_norm_max)
    if policy.weight_growth_max is not None:
        last = st.last_weight_norm
        growth = (wnorm - last) / xp.maximum(last, _TINY)
        tests.append(xp.logical_and(xp.isfinite(last), growth > policy.weight_growth_max))
    return tests[0] if len(tests) == 1 else xp.logical_or(tests[0], tests[1])


def update(xp: Namespace, st: PenaltyState | Empty,
           weight_norm: Array | None) -> PenaltyState | Empty:
    """Remembers this update's weight norm (kept only if the update is applied)."""
    if isinstance(st, Empty) or weight_norm is None:
        return st
    return PenaltyState(xp.astype(weight_norm, xp.float32))
