"""The state of a safeopt-wrapped Optax transformation, finding it, and loading saved ones."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_optax._recover import Snapshot

__all__ = ["SafeInfo", "SafeState", "register_flax_serialization", "replicate_like",
           "upgrade_state_dict"]


@dataclasses.dataclass(frozen=True)
class SafeInfo:
    """The static part of a :class:`SafeState`: no leaves, part of the tree definition.

    Attributes:
      policy: The policy the transformation was built with.
      names: ``jax.tree_util.keystr`` of each parameter leaf path, in leaf order.
    """

    policy: Policy
    names: tuple[str, ...]


jax.tree_util.register_static(SafeInfo)


class SafeState(NamedTuple):
    """State of a safeopt-wrapped Optax transformation.

    Attributes:
      safe: safeopt's state (``safeopt.adapter.State``: one part per feature).
      inner: The inner transformation's state.
      info: Policy and parameter names; static (no leaves).
      snapshot: The recovery snapshot (:class:`Snapshot`) with ``recover=True``,
        else ``safeopt.adapter.EMPTY`` (no leaves).
    """

    safe: sa.State
    inner: optax.OptState
    info: SafeInfo
    snapshot: Snapshot | sa.Empty = sa.EMPTY


_FLAX_REGISTERED = False


def register_flax_serialization() -> None:
    """Lets ``flax.serialization`` (if the caller imported it) skip :class:`SafeInfo`."""
    global _FLAX_REGISTERED
    serialization = sys.modules.get("flax.serialization")
    if _FLAX_REGISTERED or serialization is None:
        return
    serialization.register_serialization_state(
        SafeInfo, lambda info: {}, lambda info, state_dict: info, override=True)
    _FLAX_REGISTERED = True


def replicate_like(state: SafeState, params: Any) -> SafeState:
    """Puts the single-device leaves of ``state`` replicated on the mesh of ``params``.

    ``update`` leaves scalars such as the step counters replicated over the
    parameters' devices, while ``init`` creates them on one device (bare
    Optax's ``count`` too); replicating them here makes the state's
    shardings after ``init`` and after ``update`` match. Only for concrete
    parameters with a ``NamedSharding``: under ``jax.jit(tx.init)`` give
    ``out_shardings`` (JAX places outputs that do not depend on the inputs
    on one device), or call ``init`` un-jitted.
    """
    mesh = None
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(leaf, jax.core.Tracer) and isinstance(
                sharding, jax.sharding.NamedSharding):
            mesh = sharding.mesh
            break
    if mesh is None:
        return state
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x: Any) -> Any:
        single = isinstance(getattr(x, "sharding", None), jax.sharding.SingleDeviceSharding)
        return jax.device_put(x, replicated) if single else x

    return jax.tree.map(place, state)


def upgrade_state_dict(saved: Any, target: SafeState) -> SafeState:
    """``target`` with the values of a saved state, including one saved by safeopt 0.1.

    Args:
      saved: The saved :class:`SafeState` as a state dict (what
        ``flax.serialization.to_state_dict`` or ``msgpack_restore`` gives:
        ``{"safe": ..., "inner": ..., "info": ...}``).
      target: ``tx.init(params)`` of the same transformation and parameters.

    Returns:
      The restored state. safeopt's part is read from either layout; the
      inner state (and the recovery snapshot, when both hold one) is
      restored onto ``target``'s with ``flax.serialization.from_state_dict``
      (flax must be installed). A state saved without a snapshot (by 0.1,
      or without ``recover``) keeps ``target``'s: no snapshot held yet.
    """
    from flax import serialization

    restored = _safe_from_dict(saved["safe"], target.safe)
    inner = serialization.from_state_dict(target.inner, saved["inner"])
    snapshot = target.snapshot
    held = saved.get("snapshot") or {}
    if isinstance(snapshot, Snapshot) and held:
        snapshot = snapshot._replace(
            params=serialization.from_state_dict(snapshot.params, held["params"]),
            inner=serialization.from_state_dict(snapshot.inner, held["inner"]),
            safe=_safe_from_dict(held["safe"], snapshot.safe),
            restored=jnp.asarray(held["restored"], jnp.int32),
            missed_at=jnp.asarray(held["missed_at"], jnp.int32))
    return SafeState(safe=restored, inner=inner, info=target.info, snapshot=snapshot)


def _safe_from_dict(saved: Any, target: sa.State) -> sa.State:
    """safeopt's state from a state dict of either layout (0.1's flat one, or per feature)."""
    safe = dict(saved)
    flat = sa.upgrade(safe) if sa.is_legacy(safe) else {
        f"{feature}.{field}": value for feature, part in safe.items()
        for field, value in dict(part).items()}
    return sa.unflatten(target, flat, lambda v, cur: jnp.asarray(v, cur.dtype))
