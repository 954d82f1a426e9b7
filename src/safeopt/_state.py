"""safeopt's state: one small state per feature, put together.

:class:`State` holds the state of each feature module listed in
:data:`FEATURES`, in order; a feature the policy does not use holds
:class:`~safeopt._features.base.Empty`. Each feature names the fields a
skipped update may change (its ``SKIPPABLE``); :func:`keep_on_skip` puts
every other field back as it was, so that a skipped update never happened.

Adapters store the state their own way (a pytree in Optax, optimizer
variables in Keras, tensors in a torch state dict) through :func:`flatten`
and :func:`unflatten`, which name each field ``"feature.field"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

from safeopt._features import adaptive, counters, monitor, penalty, recovery, spike
from safeopt._features.base import Empty
from safeopt._policy import Policy
from safeopt._xp import Array, Namespace


class State(NamedTuple):
    """The state of every feature of a policy (see :data:`FEATURES`)."""

    counters: counters.Counters
    adaptive: adaptive.ZScoreState | adaptive.PercentileState | Empty
    spike: spike.SpikeState | Empty
    penalty: penalty.PenaltyState | Empty
    monitor: monitor.MonitorState | Empty
    recovery: recovery.RecoveryState | Empty


#: The feature modules, by their field in :class:`State`.
FEATURES: dict[str, ModuleType] = {"counters": counters, "adaptive": adaptive, "spike": spike,
                                   "penalty": penalty, "monitor": monitor,
                                   "recovery": recovery}


def init_state(xp: Namespace, policy: Policy, n_tensors: int = 0,
               like: Array | None = None) -> State:
    """The initial state of ``policy`` for ``n_tensors`` parameter tensors.

    Args:
      xp: The array namespace the state lives in.
      policy: The policy.
      n_tensors: Number of parameter tensors (sizes the per-layer monitor).
      like: An array whose device the state should live on (torch).
    """
    return State(*(module.init(xp, policy, n_tensors, like) for module in FEATURES.values()))


def keep_on_skip(xp: Namespace, old: State, new: State, apply: Array) -> State:
    """``new`` where ``apply``, else ``old``, except each feature's ``SKIPPABLE`` fields."""
    parts: list[Any] = []
    for module, was, now in zip(FEATURES.values(), old, new):
        if not now._fields:
            parts.append(now)
            continue
        skippable = module.SKIPPABLE
        parts.append(type(now)(*(
            b if field in skippable or b is a else xp.where(apply, b, a)
            for field, a, b in zip(now._fields, was, now))))
    return State(*parts)


def flatten(state: State) -> dict[str, Array]:
    """``{"feature.field": array}`` for every field of every feature in use."""
    return {f"{name}.{field}": value
            for name, part in zip(State._fields, state)
            for field, value in zip(part._fields, part)}


def unflatten(template: State, flat: Mapping[str, Any],
              convert: Callable[[Any, Array], Array] | None = None) -> State:
    """``template`` with the values of ``flat`` (keys as :func:`flatten` makes them).

    A key missing from ``flat``, or a value whose shape differs from the
    template's (a resized buffer), keeps the template's value. ``convert``
    turns a loaded value into the template's kind of array.
    """
    parts: list[Any] = []
    for name, part in zip(State._fields, template):
        fields = []
        for field, current in zip(part._fields, part):
            value = flat.get(f"{name}.{field}")
            if value is None or tuple(getattr(value, "shape", ())) != tuple(current.shape):
                fields.append(current)
            else:
                fields.append(value if convert is None else convert(value, current))
        parts.append(type(part)(*fields))
    return State(*parts)


def map_state(fn: Callable[..., Array], state: State, *others: State) -> State:
    """``fn`` applied to every array of ``state`` (with the matching arrays of ``others``)."""
    parts: list[Any] = [type(part)(*(fn(*values) for values in zip(part, *more)))
                        for part, *more in zip(state, *others)]
    return State(*parts)
