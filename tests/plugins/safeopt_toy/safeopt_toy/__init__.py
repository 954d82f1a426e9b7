"""A toy NumPy optimizer and its safeopt adapter: what a third-party plug-in looks like.

It uses only :mod:`safeopt.adapter`: the core's step with the default
kernels, and the core's divergence check, recovery bookkeeping, telemetry and
diagnosis, which it does not write (it says how to copy and put back its
parameters for a recovery, and scales a backed-off update).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import safeopt.adapter as sa


class ToySGD:
    """Plain SGD over a list of NumPy arrays, updated in place."""

    def __init__(self, params: list[np.ndarray], lr: float = 0.1) -> None:
        self.params = params
        self.lr = lr

    def step(self, grads: list[np.ndarray | None]) -> None:
        for p, g in zip(self.params, grads):
            if g is not None:
                p -= self.lr * g


class SafeToySGD:
    """:class:`ToySGD` protected by a safeopt policy."""

    def __init__(self, inner: ToySGD, policy: sa.Policy) -> None:
        self.inner = inner
        self.policy = policy
        self.kernels = sa.Kernels(sa.namespace_by_name("numpy"))
        self.state = sa.init_state(self.kernels.xp, policy, n_tensors=len(inner.params))
        self.steps = 0
        self.recovery = sa.HostRecovery(policy, copy=lambda: [p.copy() for p in inner.params],
                                        restore=self._put_back)

    def _put_back(self, params: list[np.ndarray]) -> None:
        for p, saved in zip(self.inner.params, params):
            p[...] = saved

    def step(self, grads: list[np.ndarray | None], loss: float | None = None) -> None:
        """One protected step (``None``: that parameter has no gradient)."""
        present = [i for i, g in enumerate(grads) if g is not None]
        with np.errstate(all="ignore"):
            out = sa.step(self.kernels, self.policy, self.state, [grads[i] for i in present],
                          [self.inner.params[i] for i in present],
                          None if loss is None else np.float32(loss),
                          positions=present, n_tensors=len(grads))
        self.recovery.before_apply(out.decision, self.state)
        self.state = out.state  # counted, even if the recoveries have run out
        self.state = self.recovery.recover(self.kernels.xp, out.decision, out.state, self)
        if not bool(out.decision.skip):  # NumPy: reading the flag costs nothing
            factor = 1.0 if out.decision.lr_factor is None else float(out.decision.lr_factor)
            new: list[np.ndarray | None] = [None] * len(grads)
            for i, g in zip(present, out.grads):
                new[i] = np.float32(factor) * g
            self.inner.step(new)
        self.steps += 1
        sa.after_step(self, self.steps, self.policy, check=False)
        sa.raise_if_diverged(self.policy, sa.summarize(self.policy, self.state), self)


class ToyAdapter(sa.Adapter):
    """Wraps :class:`ToySGD`."""

    name = "toy"

    def accepts(self, optimizer: Any) -> bool:
        return isinstance(optimizer, ToySGD)

    def wrap(self, optimizer: Any, policy: sa.Policy) -> SafeToySGD:
        return SafeToySGD(optimizer, policy)

    def owns(self, obj: Any) -> bool:
        return isinstance(obj, SafeToySGD)

    def read(self, obj: Any) -> tuple[sa.Policy, sa.State, dict[str, Any]]:
        names = [f"w{i}" for i in range(len(obj.inner.params))]
        return obj.policy, obj.state, {"path": "numpy", "names": names}
