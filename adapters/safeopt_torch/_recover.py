"""Recovery in torch: snapshots of the parameters and the inner state, restores, LR back-off.

The core decides (:mod:`safeopt._features.recovery`); this module keeps the
snapshot and puts it back. A snapshot is a copy of every parameter, of the
inner optimizer's per-parameter state and of safeopt's state, in host memory
(pinned, copied without blocking, when the parameters live on an
accelerator; a plain copy on CPU): about ``params + optimizer state`` bytes
of host memory, twice while a new snapshot waits to be confirmed (below), and
one copy of the model and its optimizer state every ``snapshot_every``
updates.

With host decisions (CPU) the decision is known at once: the snapshot is
taken before the update it belongs to, and a recovery restores at once. On
the device path the host learns the decision's flags with the divergence
guard's read, :data:`~safeopt_torch._watch.LAG` updates later on an
accelerator (at once on CPU): it copies the state at every update on the
snapshot cadence and keeps the copy once the flags say the update was
healthy; it restores when the flags say so, which then also rolls back the
updates decided in between. The learning-rate back-off is applied by
scaling each parameter group's ``lr`` for the inner step (and putting it
back, so LR schedulers see their own values).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch import _batch

Copy = tuple[list[Tensor], list[dict[str, Any] | None]]


class TorchRecovery:
    """The snapshots of one wrapped torch optimizer.

    Args:
      inner: The wrapped optimizer.
      policy: The policy (``recover`` on).
    """

    def __init__(self, inner: torch.optim.Optimizer, policy: Policy) -> None:
        self.inner = inner
        self.policy = policy
        self.held: tuple[Copy, sa.State] | None = None
        self.pending: dict[int, tuple[Copy, sa.State]] = {}
        self.restored_at = -1  # update index of the last restore, -1 before any
        self._free: list[Copy] = []  # copies no longer needed, whose buffers are reused

    # -- the learning-rate back-off -------------------------------------------------
    def factor(self, t: int) -> float:
        """The back-off at update ``t`` (1 when no restore happened)."""
        policy = self.policy
        if self.restored_at < 0 or policy.recover_warmup == 0:
            return 1.0
        ramp = np.float32(min((t - self.restored_at) / policy.recover_warmup, 1.0))
        low = np.float32(policy.recover_lr_factor)
        return float(low + (np.float32(1.0) - low) * ramp)

    @contextlib.contextmanager
    def backed_off(self, t: int) -> Iterator[None]:
        """Scales every group's ``lr`` by :meth:`factor` meanwhile."""
        factor = self.factor(t)
        if factor == 1.0:
            yield
            return
        lrs = [group["lr"] for group in self.inner.param_groups]
        for group in self.inner.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            yield
        finally:
            for group, lr in zip(self.inner.param_groups, lrs):
                group["lr"] = lr

    # -- snapshots ------------------------------------------------------------------------
    def copy(self) -> Copy:
        """Copies every parameter and its inner state to host memory.

        The buffers of a copy no longer needed are reused (allocating, and
        on an accelerator pinning, host memory costs more than copying).
        """
        params = _params(self.inner)
        old = self._free.pop() if self._free else None
        values = [_store(_batch.local(p), _slot(old, i)) for i, p in enumerate(params)]
        states: list[dict[str, Any] | None] = []
        for i, p in enumerate(params):
            if p not in self.inner.state:
                states.append(None)
                continue
            before = old[1][i] if old is not None and i < len(old[1]) else None
            states.append({k: _store(_batch.local(v), (before or {}).get(k))
                           if isinstance(v, Tensor) else v
                           for k, v in self.inner.state[p].items()})
        return values, states

    def _release(self, saved: Copy) -> None:
        self._free[:] = [saved]  # one spare set is enough: a copy is replaced by the next

    def _hold(self, copy: tuple[Copy, sa.State]) -> None:
        if self.held is not None and self.held[0] is not copy[0]:
            self._release(self.held[0])
        self.held = copy

    def put_back(self, saved: Copy) -> None:
        """Restores a :meth:`copy` in place, bit for bit."""
        values, states = saved
        with torch.no_grad():
            for p, value, state in zip(_params(self.inner), values, states):
                _batch.local(p).copy_(value, non_blocking=True)
                if state is None:
                    self.inner.state.pop(p, None)
                    continue
                current = self.inner.state[p]
                for k in [k for k in current if k not in state]:
                    del current[k]
                for k, v in state.items():
                    now = current.get(k)
                    if isinstance(v, Tensor) and isinstance(now, Tensor) and \
                            now.shape == v.shape and now.dtype == v.dtype:
                        _batch.local(now).copy_(v, non_blocking=True)  # in place: kernels,
                    elif isinstance(v, Tensor):  # compiled graphs keep their tensors
                        current[k] = v.to(_batch.local(p).device, copy=True)
                    else:
                        current[k] = v

    # -- host decisions: the decision is known ----------------------------------------
    def host(self, decision: sa.Decision, before: sa.State, new: sa.State, t: int,
             owner: Any) -> sa.State:
        """Snapshot before the update, or restore; returns safeopt's state."""
        if decision.snapshot is not None and bool(decision.snapshot):
            if self.held is not None:
                self._release(self.held[0])
                self.held = None
            self.held = (self.copy(), before)
        return self._recover(bool(decision.recover), new, t, owner)

    # -- device decisions: the flags come with the guard's read -----------------------------
    def before_device_update(self, t: int, before: sa.State) -> None:
        """Copies the state at an update on the snapshot cadence, to keep if healthy."""
        if t % self.policy.snapshot_every == 0:
            self.pending[t] = (self.copy(), sa.map_state(_clone, before))

    def flags(self, u: int, recover: bool, snapshot: bool, new: sa.State, t: int,
              owner: Any) -> sa.State:
        """The flags of update ``u`` have arrived (``t``: the latest update)."""
        if snapshot and u in self.pending:
            self._hold(self.pending.pop(u))
        for old in [v for v in self.pending if v <= u]:
            self._release(self.pending.pop(old)[0])
        if recover and u > self.restored_at:  # a restore covers the triggers decided before it
            self.pending.clear()
            return self._recover(True, new, t, owner)
        return new

    def _recover(self, recover: bool, new: sa.State, t: int, owner: Any) -> sa.State:
        if not recover:
            return new
        recoveries = int(np.asarray(new.recovery.recoveries))  # type: ignore[union-attr]
        if self.held is None or recoveries >= self.policy.max_recoveries:
            sa.raise_recovery_exhausted(self.policy, sa.summarize(
                self.policy, sa.map_state(_numpy, new)), owner)
        assert self.held is not None
        saved, snapshot_state = self.held
        self.put_back(saved)
        self.restored_at = t
        xp = sa.namespace(new.counters.steps)
        return sa.after_restore(xp, new, sa.map_state(lambda v: _like(v, new), snapshot_state))


def _params(inner: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in inner.param_groups for p in group["params"]]


def _slot(old: Copy | None, i: int) -> Tensor | None:
    return old[0][i] if old is not None and i < len(old[0]) else None


def _store(t: Tensor, into: Any = None) -> Tensor:
    """A copy of ``t`` in host memory (pinned and without blocking from an accelerator).

    ``into``, a host tensor of ``t``'s shape and dtype, is reused when given.
    """
    t = t.detach()
    if not (isinstance(into, Tensor) and into.shape == t.shape and into.dtype == t.dtype):
        if t.device.type == "cpu":
            return t.clone()
        into = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return into.copy_(t, non_blocking=t.device.type != "cpu")


def _clone(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else np.array(v)[()]


def _numpy(v: Any) -> Any:
    return np.array(v.detach().cpu().numpy()) if isinstance(v, Tensor) else np.array(v)


def _like(v: Any, new: sa.State) -> Any:
    """A snapshot value in the kind of array the current state holds."""
    steps = new.counters.steps
    if isinstance(steps, Tensor):
        return v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v)).to(steps.device)
    return v
