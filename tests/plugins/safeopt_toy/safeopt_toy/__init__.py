"""A toy NumPy optimizer and its safeopt adapter: what a third-party plug-in looks like."""

from __future__ import annotations

from typing import Any

import numpy as np

import safeopt


class ToySGD:
    """Plain SGD over a list of NumPy arrays, updated in place."""

    def __init__(self, params: list[np.ndarray], lr: float = 0.1) -> None:
        self.params = params
        self.lr = lr

    def step(self, grads: list[np.ndarray], loss: float | None = None) -> None:
        for p, g in zip(self.params, grads):
            p -= self.lr * g


class SafeToySGD:
    """``ToySGD`` protected by a safeopt policy, through the NumPy reference."""

    def __init__(self, inner: ToySGD, policy: safeopt.Policy) -> None:
        self.inner = inner
        self.policy = policy
        self.xp = safeopt.namespace_by_name("numpy")
        self.state = safeopt.init_state(self.xp, policy)

    def step(self, grads: list[np.ndarray], loss: float | None = None) -> None:
        params = self.inner.params if self.policy.needs_params else None
        value = None if loss is None else np.float32(loss)
        new, decision, self.state = safeopt.protect(self.xp, self.policy, self.state, grads,
                                                    params, loss=value)
        if not bool(decision.skip):  # NumPy: reading the flag costs nothing
            self.inner.step(new)


class ToyAdapter(safeopt.Adapter):
    """Wraps :class:`ToySGD`."""

    name = "toy"

    def accepts(self, optimizer: Any) -> bool:
        return isinstance(optimizer, ToySGD)

    def wrap(self, optimizer: Any, policy: safeopt.Policy) -> SafeToySGD:
        return SafeToySGD(optimizer, policy)

    def owns(self, obj: Any) -> bool:
        return isinstance(obj, SafeToySGD)

    def read(self, obj: Any) -> tuple[safeopt.Policy, safeopt.PolicyState, dict[str, Any]]:
        return obj.policy, obj.state, {"path": "numpy"}
