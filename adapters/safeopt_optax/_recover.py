"""Recovery in Optax: the snapshot rides in the state, restores happen inside the compiled step.

The core decides (:mod:`safeopt._features.recovery`: ``Decision.snapshot``,
``Decision.recover``, ``Decision.lr_factor``); under ``jax.jit`` nothing can
branch on the host, so the snapshot lives *in the state*, in
:class:`Snapshot` (``SafeState.snapshot``; ``safeopt.adapter.EMPTY``, with no
leaves, when the policy does not recover, so that such states keep their
leaves, checkpoints and memory):

* **Memory.** One copy of the parameters, of the inner state (Adam: twice
  the parameters) and of safeopt's small state, on the device, sharded like
  the originals. Checkpoints carry it, so a restore after a restart is still
  bit for bit. Under ``jax.vmap`` each model has its own.
* **Snapshot** (:func:`take`): a ``lax.cond`` whose first (false) branch
  passes the held buffers through; on a snapshot update the other branch
  copies the parameters and the inner state into them, the price of a
  snapshot (about one bare Adam step), once every ``snapshot_every`` updates.
* **Restore.** The update is skipped (the core ORs ``recover`` into
  ``skip``) and starts from the snapshot's inner state (:func:`inner_base`, a
  ``cond`` taken *before* the inner update, which reads only its result: XLA
  then keeps the donated update in place), so the skip select returns that
  state bit for bit. The updates are ``snapshot - params``, safeopt's state
  :func:`safeopt.adapter.after_restore` (:func:`finish`). A recovering update
  with no snapshot or no recovery left only skips; the core's sticky
  ``exhausted`` flag makes :func:`safeopt.check` raise.
* **Exact parameters.** Optax returns *updates*: ``params + (snapshot -
  params)`` is not the snapshot bit for bit and cannot undo a NaN/Inf weight.
  :func:`exact` (``safeopt_optax.apply_updates(params, updates, state)``)
  takes the snapshot's parameters on a restore, and is required with
  ``recover=True``. The update after a restore compares, in a ``cond`` taken
  only then, the parameters it gets with the snapshot's (``sum |params -
  snapshot|``: one fused read of both, zero exactly when they are equal; a
  NaN counts as a difference); when they differ it records the restore in
  ``Snapshot.missed_at``: an un-jitted ``update`` raises, and every read of
  the state (:func:`safeopt.stats`, :func:`safeopt.check`,
  :func:`safeopt.diagnose`) warns and reports ``restore_missed_at``.
* **Learning-rate back-off.** The updates are multiplied by
  ``Decision.lr_factor`` (exactly 1 outside a back-off, so bit-identical):
  the back-off of the learning rate for optimizers whose update is linear in
  it (SGD, momentum, Adam(W), Lion...).
* **Cost** of an update that neither snapshots nor restores: no copy (XLA
  keeps every donated buffer in place, see
  ``tests/optax_adapter/test_optax_recover.py``); the select of the restore
  reads the held parameters once more, fused into the parameter update (the
  updates must carry ``snapshot - params`` on a restore, and a ``cond`` would
  write the updates out instead of fusing them). On 2 shared CPU cores, 10M
  parameters, AdamW, donated: 1.16x the bare step with ``recover`` against
  1.14x without (10 tensors), 1.52x against 1.28x (200 tensors); a snapshot
  update 2.1-2.3x, a restore 1.4-1.9x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import safeopt.adapter as sa
from safeopt import Policy

__all__ = ["Snapshot", "exact", "finish", "init", "inner_base", "missed_restore",
           "restoring", "take"]


class Snapshot(NamedTuple):
    """The last good snapshot, and what the adapter knows about the last restore.

    Attributes:
      params: The parameters before the update that took it (the tree given to ``init``).
      inner: The inner transformation's state then.
      safe: safeopt's state then.
      restored: int32, 1 when the update that returned this state restored the
        snapshot: the parameters must become ``params`` before the next update.
      missed_at: int32, update index of the first restore whose parameters did
        not come back bit for bit (not applied with :func:`exact`), or -1.
    """

    params: optax.Params
    inner: optax.OptState
    safe: sa.State
    restored: jax.Array
    missed_at: jax.Array


def init(policy: Policy, params: optax.Params, inner: optax.OptState,
         safe: sa.State) -> Snapshot | sa.Empty:
    """No snapshot yet: copies of the initial values (``sa.EMPTY`` unless ``recover``)."""
    if not policy.recover:
        return sa.EMPTY
    copy: Callable[[Any], Any] = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    return Snapshot(copy(params), copy(inner), copy(safe), jnp.zeros((), jnp.int32),
                    jnp.full((), -1, jnp.int32))


def take(held: Snapshot, snapshot: jax.Array, weights: list[Any], inner: optax.OptState,
         safe: sa.State) -> Snapshot:
    """Checks the previous restore, then takes the snapshot the decision asks for.

    Args:
      held: The snapshot in the state passed to ``update``.
      snapshot: bool, snapshot this update (``Decision.snapshot``).
      weights: The parameter leaves given to ``update``.
      inner: The inner state given to ``update``.
      safe: safeopt's state given to ``update``.

    Returns:
      The snapshot now held, ``missed_at`` set when the parameters are not
      the ones the previous update restored. (XLA orders both ``cond``s before
      the in-place writes: the updates and the inner update read their results.)
    """
    # sum |w - h| fuses into one read of both; w == h in IEEE floats iff w - h == 0 (a NaN
    # counts as a difference, even in both)
    mismatch = jax.lax.cond(
        held.restored > 0,
        lambda: sum((jnp.sum(jnp.abs(w - h), dtype=jnp.float32)
                     for w, h in zip(weights, jax.tree.leaves(held.params))),
                    jnp.zeros((), jnp.float32)),
        lambda: jnp.zeros((), jnp.float32))
    rec = safe.recovery
    assert not isinstance(rec, sa.Empty)
    missed = jnp.logical_and(held.missed_at < 0, mismatch != 0.0)
    missed_at = jnp.where(missed, rec.last_at, held.missed_at)
    # the check reads the held parameters before a snapshot may overwrite them
    snapshot = jnp.logical_and(snapshot, jnp.logical_not(mismatch < 0.0))
    params_def: Any = jax.tree.structure(held.params)
    params, inner, safe = jax.lax.cond(  # the first (false) branch passes the buffers through
        snapshot, lambda: (params_def.unflatten(weights), inner, safe),
        lambda: (held.params, held.inner, held.safe))
    return held._replace(params=params, inner=inner, safe=safe, missed_at=missed_at)


def restoring(policy: Policy, out: sa.Step, before: sa.State) -> jax.Array:
    """Whether this update restores the snapshot: it recovers, with a snapshot and a recovery left.

    Else a recovering update is only skipped, and the core's sticky
    ``exhausted`` flag reports it.
    """
    rec = before.recovery
    assert not isinstance(rec, sa.Empty) and out.decision.recover is not None
    return jnp.logical_and(out.decision.recover, jnp.logical_and(
        rec.recoveries < policy.max_recoveries, rec.snapshot_at >= 0))


def inner_base(restore: jax.Array, held: Snapshot, inner: optax.OptState) -> optax.OptState:
    """The inner state this update starts from: the snapshot's when it restores.

    A restoring update is skipped, so the skip select then returns this state
    bit for bit. Taken *before* the inner update, which then reads only this
    value: the ``cond`` passes the donated inner state through (its first
    branch) and XLA keeps the whole update in place.
    """
    return jax.lax.cond(restore, lambda: held.inner, lambda: inner)


def finish(out: sa.Step, restore: jax.Array, held: Snapshot, weights: list[Any],
           updates: list[Any]) -> tuple[list[Any], sa.State, Snapshot]:
    """The updates, safeopt's state and the snapshot after this update.

    Args:
      out: The core's step (its decision and its new state).
      restore: From :func:`restoring`.
      held: The snapshot held after :func:`take`.
      weights: The parameter leaves given to ``update``.
      updates: The inner updates, skip applied (zeros when skipped).

    Returns:
      ``snapshot - params`` on a restore, else the updates times the
      learning-rate back-off; :func:`safeopt.adapter.after_restore` on a
      restore, else the core's new state; the snapshot with its flags.
    """
    held_params = jax.tree.leaves(held.params)
    factor = out.decision.lr_factor
    updates = [jnp.where(restore, (h - w).astype(u.dtype), _scaled(u, factor))
               for u, w, h in zip(updates, weights, held_params)]
    xp = sa.namespace_by_name("jax")
    back = sa.after_restore(xp, out.state, held.safe)
    safe = jax.tree.map(lambda a, b: jnp.where(restore, a, b), back, out.state)
    return updates, safe, held._replace(restored=jnp.asarray(restore, jnp.int32))


def _scaled(update: jax.Array, factor: Any) -> jax.Array:
    """``factor * update`` in at least float32, in the update's dtype (1 leaves it exact)."""
    if factor is None:
        return update
    wide = jnp.promote_types(update.dtype, jnp.float32)
    return (update.astype(wide) * factor.astype(wide)).astype(update.dtype)


def exact(params: optax.Params, new_params: optax.Params, held: Snapshot) -> optax.Params:
    """``new_params``, or the snapshot's parameters where the last update restored them.

    Args:
      params: The parameters before ``optax.apply_updates`` (for the error message).
      new_params: ``optax.apply_updates(params, updates)``.
      held: The snapshot in the state returned with ``updates``.
    """
    back = held.restored > 0

    def pick(snap: Any, new: Any) -> Any:
        if isinstance(snap, optax.MaskedNode):
            return new
        return jnp.where(back, snap, new)

    try:
        return jax.tree.map(pick, held.params, new_params, is_leaf=_is_masked)
    except ValueError as err:
        raise ValueError(
            "`params` must have the structure of the parameters the wrapped transformation "
            f"was initialised with. Received: params={jax.tree.structure(params)}, "
            f"initialised with {jax.tree.structure(held.params)} ({err})") from None


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def missed_restore(held: Snapshot | sa.Empty) -> int | None:
    """The update index of a restore that did not reach the parameters, or ``None`` (host read)."""
    if not isinstance(held, Snapshot):
        return None
    at = held.missed_at
    if hasattr(at, "get_value"):  # flax.nnx Variable (nnx.Optimizer's state)
        at = at.get_value()
    values = np.asarray(jax.device_get(at))
    hits = values[values >= 0]
    return int(hits.min()) if hits.size else None


def missed_text(at: int) -> str:
    """What a missed restore means, and the remedy."""
    return (
        f"safeopt restored its last good snapshot at update {at}, but the parameters given to "
        "the next update were not the snapshot's: they were updated with optax.apply_updates "
        "(or flax.nnx.Optimizer.update), which adds snapshot - params and can neither undo a "
        "NaN/Inf weight nor give the snapshot back bit for bit. With recover=True, apply the "
        "updates with safeopt_optax.apply_updates(params, updates, opt_state) (with flax.nnx: "
        "call tx.update on nnx.state(model, nnx.Param) and nnx.update the model with it).")
