"""The step under a ``tf.distribute`` strategy (TensorFlow backend).

The wrapper all-reduces the gradients itself, decides on the sums (every
replica sees the same sums, so every replica takes the same decision) and
hands the reduced gradients to the inner optimizer with its own all-reduce
turned off for that call. Keras's ``clipnorm`` family, by contrast, clips each
replica's gradients before the all-reduce. With ``recover`` the snapshot and
the restore happen in cross-replica context, on the first replica's flags
(the same on every replica), for every replica's copy of the variables.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from keras import ops

from safeopt_keras import _recover


def tf_apply(opt: Any, grads: list[Any], loss: Any) -> None:
    """The wrapper's ``apply`` on the TensorFlow backend (``grads`` aligned, ``None`` if absent)."""
    import tensorflow as tf

    grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        if tf.distribute.in_cross_replica_context() and tf.distribute.has_strategy():
            raise ValueError("apply() must be called in a replica context.")
        opt._common_apply(grads, loss)
        return
    ctx = tf.distribute.get_replica_context()
    present = [i for i, g in enumerate(grads) if g is not None]
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
    for i, g in zip(present, reduced):
        grads[i] = g
    if loss is not None:
        loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, loss)
    state = opt._read_state()
    new_grads, decision, new_state = opt._protect(grads, opt._params(), state, loss)
    snapshot = opt._snapshot
    flags: tuple[Any, ...] = ()
    if snapshot is not None:
        restore = snapshot.restoring(decision.recover, state)
        held = snapshot.held_state(opt._variables, state)
        new_state, held_next = snapshot.plan(decision.snapshot, restore, state, new_state, held)
        snapshot.assign_held(opt, held, held_next)
        flags = (decision.snapshot, restore, decision.lr_factor)
    opt._assign_state(state, new_state)
    ctx.merge_call(functools.partial(_cross_replica_step, opt),
                   args=(decision.skip, new_grads, *flags))


def _cross_replica_step(opt: Any, distribution: Any, skip: Any, grads: list[Any],
                        *flags: Any) -> None:
    """Snapshots, skips or applies, restores, on every replica (a cond runs cross-replica).

    The flags are the same on every replica, since they were computed from the
    all-reduced gradients; the first replica's copy is taken.
    """

    def first(x: Any) -> Any:
        return distribution.experimental_local_results(x)[0]

    inner = opt.inner_optimizer
    variables = list(opt._trainable_variables)
    snapshot, restore, factor = flags if flags else (None, None, None)
    if snapshot is not None:
        opt._snapshot.take(opt, first(snapshot))

    def step() -> None:
        # Around the whole call: the replicas run in threads until it returns.
        backed_off = _recover.backed_off(inner, None if factor is None else first(factor))
        with no_inner_all_reduce(inner), backed_off:
            distribution.extended.call_for_each_replica(inner.apply, args=(grads, variables))

    ops.cond(first(skip), lambda: None, step)
    if restore is not None:
        opt._snapshot.put_back(opt, first(restore))


@contextlib.contextmanager
def no_inner_all_reduce(inner: Any) -> Iterator[None]:
    """Turns the inner TF optimizer's all-reduce off: its gradients are sums already.

    Keras's TF optimizer all-reduces inside ``_backend_update_step``; the
    wrapper has done it before deciding, so a second sum would double the
    gradients.
    """
    inner.__dict__["_all_reduce_sum_gradients"] = _identity
    try:
        yield
    finally:
        inner.__dict__.pop("_all_reduce_sum_gradients", None)


def _identity(grads_and_vars: Any) -> Any:
    return grads_and_vars
