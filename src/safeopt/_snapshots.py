"""Recovery for adapters that hold their state on the host side: keep a snapshot, restore it.

:class:`HostRecovery` is the bookkeeping of :mod:`safeopt._features.recovery`
for a stateful adapter (torch, the NumPy plug-in): it takes the snapshot the
decision asks for (the adapter says how to copy its parameters and its inner
optimizer's state), and on a recovery restores it and gives safeopt's state
back, or raises once the recoveries have run out. Functional adapters (Optax,
Keras) keep the snapshot in their state and restore it inside the compiled
step instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from safeopt._divergence import raise_recovery_exhausted
from safeopt._features.recovery import after_restore
from safeopt._pipeline import Decision
from safeopt._policy import Policy
from safeopt._state import State
from safeopt._summary import summarize
from safeopt._xp import Namespace


class HostRecovery:
    """The snapshot of one wrapped optimizer, and what to do with it.

    Args:
      policy: The policy (``recover`` on).
      copy: Returns a copy of the parameters and the inner optimizer's state
        (whatever the adapter needs to put them back bit for bit).
      restore: Puts such a copy back, in place.
    """

    def __init__(self, policy: Policy, copy: Callable[[], Any],
                 restore: Callable[[Any], None]) -> None:
        self.policy = policy
        self._copy = copy
        self._restore = restore
        self.held: tuple[Any, State] | None = None

    def before_apply(self, decision: Decision, state_before: State) -> None:
        """Takes the snapshot the decision asks for (before the update is applied)."""
        if decision.snapshot is not None and bool(decision.snapshot):
            self.held = (self._copy(), state_before)

    def recover(self, xp: Namespace, decision: Decision, new_state: State,
                obj: Any = None) -> State:
        """Restores the snapshot when the decision recovers; returns safeopt's state.

        Raises:
          DivergenceError: the recoveries have run out (``max_recoveries``),
            or there is no snapshot yet to go back to.
        """
        if decision.recover is None or not bool(decision.recover):
            return new_state
        recoveries = int(new_state.recovery.recoveries)  # type: ignore[union-attr]
        if self.held is None or recoveries >= self.policy.max_recoveries:
            raise_recovery_exhausted(self.policy, summarize(self.policy, new_state), obj)
        assert self.held is not None
        payload, snapshot_state = self.held
        self._restore(payload)
        return after_restore(xp, new_state, snapshot_state)
