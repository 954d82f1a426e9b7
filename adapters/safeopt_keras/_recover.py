"""Recovery in Keras: the last good snapshot in optimizer variables, restored inside the step.

The core decides (:mod:`safeopt._features.recovery`: ``Decision.snapshot``,
``Decision.recover``, ``Decision.lr_factor``); this module keeps the snapshot
and puts it back inside the step, compiled or not, with ``ops.cond`` and
``where`` (no host decision; on the torch backend, which runs eagerly and
reads ``skip`` anyway, the flags are read in one transfer):

* **Memory.** With ``recover=True`` the wrapper holds, as non-trainable
  optimizer variables next to the originals on the device (made like the
  inner optimizer's own slots, with ``add_variable_from_reference``): a copy
  of every trainable variable, of every variable of the inner optimizer but
  its learning rate (``iterations`` and the slots: Adam's two moments), and
  of safeopt's small state. With Adam that is three times the parameters'
  bytes on top of the model and Adam's own two.
* **Snapshot.** On an update the core marks (healthy, on the
  ``snapshot_every`` cadence) an ``ops.cond`` copies the values from before
  the update into the copies; on every other update its other branch does
  nothing.
* **Restore.** A recovering update is skipped (the core ORs ``recover`` into
  ``skip``). When a snapshot is held and a recovery is left, the trainable
  variables and the inner optimizer's variables are assigned the copies, bit
  for bit (``iterations`` too: a learning-rate schedule goes back with it),
  and safeopt's state becomes :func:`safeopt.adapter.after_restore`. A
  recovering update with no snapshot or no recovery left only skips; the
  core's sticky ``exhausted`` flag makes :func:`safeopt.check` raise, at the
  next host boundary: ``safeopt_keras.DivergenceGuard`` (or
  ``SafeoptTelemetry``) in ``model.fit``, at once from the step on the
  torch backend.
* **Learning-rate back-off.** The learning rate is not in the snapshot: it
  belongs to whoever sets it (a schedule of ``iterations``, a callback such as
  ``ReduceLROnPlateau``, the user), as in torch, whose snapshot holds the
  per-parameter state only. During the inner update, the learning rate the
  inner optimizer reads (``learning_rate``, from ``_get_current_learning_rate``,
  replaced on the instance for the call) is multiplied by
  ``Decision.lr_factor``: every use of it in the update is backed off, the
  update rule and decoupled weight decay (AdamW) alike, whatever the
  optimizer. The factor is exactly 1 outside a back-off, and ``lr * 1`` is
  ``lr``: bit-identical updates.
* **Saving.** The copies are optimizer variables: ``model.save`` writes them
  and ``keras.models.load_model`` reads them back, so a restore after a
  restart is still bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_keras._kernels import value_of

__all__ = ["Snapshot", "backed_off"]


class Snapshot:
    """The snapshot of one wrapper: where its copies are among the wrapper's own variables.

    Built by the wrapper's ``build``, after the inner optimizer's: it adds the
    copies to the wrapper's variables (``optimizer.variables``).

    Args:
      opt: The wrapper being built.
      var_list: Its trainable variables.
      initial: safeopt's initial state (sizes the copy of the state).
    """

    def __init__(self, opt: Any, var_list: Sequence[Any], initial: sa.State) -> None:
        own = opt._variables
        inner = opt.inner_optimizer
        rate = getattr(inner, "_learning_rate", None)
        #: Positions, in ``inner_optimizer.variables``, of the variables copied.
        self.inner_of = [j for j, v in enumerate(inner.variables) if v is not rate]
        self.params = _add(own, [opt.add_variable_from_reference(v, name="safeopt_snapshot")
                                 for v in var_list])
        self.inner = _add(own, [opt.add_variable_from_reference(inner.variables[j],
                                                                name="safeopt_snapshot")
                                for j in self.inner_of])
        self.state: dict[str, int] = {}
        for key, value in sa.flatten(initial).items():
            value = np.asarray(value)
            self.state[key] = len(own)
            opt.add_variable(shape=value.shape, initializer=value, dtype=str(value.dtype),
                             aggregation="only_first_replica",
                             name="safeopt_snapshot_" + key.replace(".", "_"))
        self.policy: Policy = opt.policy
        self.xp = opt._kernels.xp

    @property
    def size(self) -> int:
        """How many variables the snapshot adds to the wrapper's."""
        return len(self.params) + len(self.inner) + len(self.state)

    # -- deciding (pure) -----------------------------------------------------------------
    def held_state(self, own: Sequence[Any], template: sa.State) -> sa.State:
        """safeopt's state in the snapshot, from the wrapper's own variables (or values)."""
        return sa.unflatten(template, {key: value_of(own[i]) for key, i in self.state.items()},
                            lambda v, _: v)

    def restoring(self, recover: Any, before: sa.State) -> Any:
        """Whether this update restores: it recovers, with a snapshot and a recovery left.

        Else a recovering update only skips, and the core's sticky ``exhausted``
        flag reports it.
        """
        rec = before.recovery
        assert not isinstance(rec, sa.Empty)
        xp = self.xp
        left = xp.logical_and(rec.recoveries < self.policy.max_recoveries, rec.snapshot_at >= 0)
        return xp.logical_and(recover, left)

    def plan(self, snapshot: Any, restore: Any, before: sa.State, new: sa.State,
             held: sa.State) -> tuple[sa.State, sa.State]:
        """safeopt's state after this update, and the snapshot's copy of it.

        Args:
          snapshot: Whether this update snapshots (a bool array, or a Python
            bool read on the host).
          restore: Whether it restores (likewise).
          before: The state before the update.
          new: The core's state after it.
          held: The snapshot's state before the update.
        """
        xp = self.xp
        back = sa.after_restore(xp, new, held) if restore is not False else new
        return _select(xp, restore, back, new), _select(xp, snapshot, before, held)

    # -- stateful steps (TensorFlow, torch) --------------------------------------------------
    def apply(self, opt: Any, before: sa.State, decision: sa.Decision, new: sa.State,
              inner_step: Callable[[], None]) -> Any:
        """Snapshots, runs ``inner_step`` backed off unless skipped, restores.

        Args:
          opt: The wrapper.
          before: safeopt's state before the update (read from its variables).
          decision: The core's decision.
          new: The core's state after the update.
          inner_step: Applies the protected gradients with the inner optimizer.

        Returns:
          The skip flag (a Python bool on the torch backend).
        """
        assert decision.snapshot is not None and decision.recover is not None
        restore = self.restoring(decision.recover, before)
        snapshot, skip, restore = _flags(decision.snapshot, decision.skip, restore)
        held = self.held_state(opt._variables, before)
        state, held_next = self.plan(snapshot, restore, before, new, held)
        self.take(opt, snapshot)
        # the snapshot's state first: on torch, ``before`` shares the state variables' memory
        self.assign_held(opt, held, held_next)
        opt._assign_state(before, state)
        with backed_off(opt.inner_optimizer, decision.lr_factor):
            ops.cond(skip, lambda: None, inner_step)
        self.put_back(opt, restore)
        return skip

    def pairs(self, opt: Any) -> list[tuple[Any, Any]]:
        """``(copy, original)`` for the trainable variables and the inner optimizer's."""
        own, inner = opt._variables, opt.inner_optimizer.variables
        return ([(own[i], v) for i, v in zip(self.params, opt._trainable_variables)]
                + [(own[i], inner[j]) for i, j in zip(self.inner, self.inner_of)])

    def take(self, opt: Any, pred: Any) -> None:
        """Copies the variables into the snapshot when ``pred`` (before the update)."""
        _assign_when(pred, self.pairs(opt))

    def put_back(self, opt: Any, pred: Any) -> None:
        """Assigns the snapshot to the variables when ``pred``, bit for bit."""
        _assign_when(pred, [(var, held) for held, var in self.pairs(opt)])

    def assign_held(self, opt: Any, held: sa.State, new: sa.State) -> None:
        """Writes the snapshot's state where it changed."""
        before = sa.flatten(held)
        for key, value in sa.flatten(new).items():
            if value is not before[key]:
                opt._variables[self.state[key]].assign(value)

    # -- the functional step (JAX) ----------------------------------------------------------
    def stateless(self, own: list[Any], inner: list[Any], params: list[Any],
                  before: sa.State, decision: sa.Decision, new: sa.State,
                  ) -> tuple[list[Any], list[Any], sa.State]:
        """Snapshot and restore on values: the inner update's inputs, safeopt's state.

        Args:
          own: The wrapper's own variable values; the snapshot's are replaced.
          inner: The inner optimizer's variable values.
          params: The trainable variable values.
          before: safeopt's state before the update.
          decision: The core's decision.
          new: The core's state after the update.

        Returns:
          ``(inner, params, state)``: what the inner update starts from (the
          snapshot's values on a restore, which skips: then they are the result)
          and safeopt's state after the update. ``own`` holds the new snapshot.
        """
        assert decision.snapshot is not None and decision.recover is not None
        restore = self.restoring(decision.recover, before)
        mine = [inner[j] for j in self.inner_of]
        held_params = [own[i] for i in self.params]
        held_inner = [own[i] for i in self.inner]
        held_params, held_inner = ops.cond(  # the copies pass through, but on a snapshot
            decision.snapshot, lambda: (list(params), mine), lambda: (held_params, held_inner))
        base_params, base_inner = ops.cond(  # taken before the inner update, which reads it
            restore, lambda: (held_params, held_inner), lambda: (list(params), mine))
        held = self.held_state(own, before)
        state, held_next = self.plan(decision.snapshot, restore, before, new, held)
        for i, value in zip(self.params + self.inner, list(held_params) + list(held_inner)):
            own[i] = value
        for key, value in sa.flatten(held_next).items():
            own[self.state[key]] = value
        inner = list(inner)
        for j, value in zip(self.inner_of, base_inner):
            inner[j] = value
        return inner, list(base_params), state

    # -- saving ----------------------------------------------------------------------------
    def forget(self, opt: Any) -> None:
        """Marks that no snapshot is held (a file saved without the snapshot was loaded)."""
        rec = opt.state_variables().recovery
        rec.snapshot_at.assign(np.full((), -1, np.int32))


@contextlib.contextmanager
def backed_off(inner: Any, factor: Any) -> Iterator[None]:
    """The inner optimizer reads its learning rate times ``factor`` meanwhile.

    ``factor`` is ``Decision.lr_factor`` (``None``: no back-off, nothing done).
    """
    if factor is None:
        yield
        return
    current = type(inner)._get_current_learning_rate.__get__(inner)

    def scaled() -> Any:
        rate = ops.convert_to_tensor(current())
        return rate * ops.cast(factor, keras.backend.standardize_dtype(rate.dtype))

    inner.__dict__["_get_current_learning_rate"] = scaled
    try:
        yield
    finally:
        inner.__dict__.pop("_get_current_learning_rate", None)


def _add(own: list[Any], created: list[Any]) -> list[int]:
    """Positions of ``created``, the last variables added to ``own``."""
    return list(range(len(own) - len(created), len(own)))


def _select(xp: sa.Namespace, pred: Any, a: sa.State, b: sa.State) -> sa.State:
    """``a`` where ``pred``, else ``b``; a Python bool picks without computing."""
    if isinstance(pred, bool):
        return a if pred else b
    return sa.map_state(lambda x, y: y if x is y else xp.where(pred, x, y), a, b)


def _flags(*preds: Any) -> tuple[Any, ...]:
    """On the torch backend the flags as Python bools, in one transfer; else as they are."""
    if keras.backend.backend() != "torch":
        return preds
    values = ops.convert_to_numpy(ops.stack([ops.cast(p, "int32") for p in preds]))
    return tuple(bool(v) for v in np.asarray(values).reshape(-1))


def _assign_when(pred: Any, pairs: Sequence[tuple[Any, Any]]) -> None:
    """``target.assign(source)`` for every ``(target, source)`` pair, under ``ops.cond(pred)``."""
    def assign() -> None:
        for target, source in pairs:
            target.assign(source)

    ops.cond(pred, assign, lambda: None)
