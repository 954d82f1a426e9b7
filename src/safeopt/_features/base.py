"""What every feature module shares: the empty state and a few array helpers."""

from __future__ import annotations

from typing import Any, NamedTuple

from safeopt._xp import Array, Namespace


class Empty(NamedTuple):
    """The state of a feature the policy does not use: no fields, no leaves.

    Like ``optax.EmptyState``: it costs nothing to carry through ``jax.jit``,
    a Keras optimizer's variables or a torch state dict.
    """


EMPTY = Empty()


def filled(xp: Namespace, shape: tuple[int, ...], value: float, dtype: Any,
           like: Array | None) -> Array:
    """A new array of ``shape`` filled with ``value`` (created once, at init)."""
    if not shape:
        return xp.asarray(value, dtype, like=like)
    return xp.asarray([value] * shape[0] if shape[0] else [], dtype, like=like)


def count_if(xp: Namespace, counter: Array, event: Array) -> Array:
    """``counter + 1`` where ``event``, else ``counter`` (int32 counters, branch-free)."""
    return counter + xp.astype(event, xp.int32)


def ring_push(xp: Namespace, ring: Array, count: Array, value: Array) -> Array:
    """Writes ``value`` at position ``count % len(ring)`` (a select, no scatter)."""
    slot = count % ring.shape[0]
    return xp.where(xp.arange(ring.shape[0], like=ring) == slot, value, ring)


def pick(xp: Namespace, values: Array, index: Array) -> Array:
    """``values[index]`` for a 0-d integer ``index``, as a masked sum.

    Indexing with a device integer reads it back to the host in torch
    (``aten::_local_scalar_dense``); a masked sum stays on the device
    everywhere, and adding zeros is exact.
    """
    hit = xp.arange(values.shape[0], like=values) == index
    return xp.sum(xp.where(hit, values, 0.0))
