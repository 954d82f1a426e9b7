"""What the trainer integrations share: finding safeopt's optimizer, and what a policy clips."""

from __future__ import annotations

from typing import Any

from safeopt import Policy
from safeopt_torch._optimizer import SafeOptimizer

#: Attributes through which trainers' optimizer wrappers hold the optimizer they
#: wrap: accelerate's ``AcceleratedOptimizer.optimizer``, Lightning's
#: ``LightningOptimizer._optimizer``.
_WRAPPED = ("optimizer", "_optimizer")


def find(obj: Any) -> SafeOptimizer | None:
    """The :class:`SafeOptimizer` in ``obj`` or in the trainer wrappers around it."""
    for _ in range(4):
        # Lightning's wrapper subclasses the optimizer's class and copies its
        # ``__dict__``: the optimizer itself is the one it holds.
        if isinstance(obj, SafeOptimizer) and "_optimizer" not in vars(obj):
            return obj
        inner = next((getattr(obj, a) for a in _WRAPPED if getattr(obj, a, None) is not None),
                     None)
        if inner is None or inner is obj:
            return None
        obj = inner
    return None


def clipping(policy: Policy) -> dict[str, Any]:
    """The policy's keys that clip gradients (``clip_norm``, ``clip_value``), when set."""
    return {key: getattr(policy, key) for key in ("clip_norm", "clip_value")
            if getattr(policy, key) is not None}
