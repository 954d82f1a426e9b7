"""safeopt for Optax: a jit- and sharding-friendly safe gradient transformation.

``safeopt.wrap(optax.adamw(1e-3), policy)`` returns an
:class:`optax.GradientTransformationExtraArgs` that runs safeopt's policy
(skip on NaN/Inf, L1/L2 penalty, value clip, global / per-tensor / unitwise
norm clip) in front of the inner transformation, inside the same compiled
computation: no host callback, no Python branch on array values.

How it fits together:

* **State.** :class:`SafeState` is a ``NamedTuple`` of safeopt's own
  state (``safe``: one small ``NamedTuple`` per feature, empty for the
  features the policy does not use), the inner transformation's state
  (``inner``) and a :class:`SafeInfo` (``info``). ``SafeInfo`` holds the
  policy and the parameter names (``jax.tree_util.keystr`` of each leaf
  path, taken at ``init``); it is registered with ``jax.tree_util.register_static``,
  so it has *no leaves*: it rides in the state's tree definition, survives
  ``jax.jit``, ``jax.vmap``, ``jax.eval_shape`` and donation, and is what lets
  ``safeopt.stats(state)`` and ``safeopt.check(state)`` know the policy and the
  names from the state alone. A checkpoint holds only the leaves; restore it
  onto the structure of ``tx.init(params)`` (orbax, ``flax.serialization``
  with a target, or ``jax.tree.unflatten``), the static part then comes from
  the code, as the transformation itself does. A state saved by safeopt 0.1
  loads through :func:`upgrade_state_dict`.
* **A skipped update never happened.** The updates returned are zeros, the
  inner state is the one passed in, bit for bit, and only safeopt's skip
  counters move. Unlike ``optax.apply_if_finite`` there is no limit after
  which a NaN update is let through. The selection is a ``jnp.where`` per
  state leaf, applied inside the traced inner update as soon as each new
  state value is defined (see :func:`skip_select`): that keeps XLA's
  in-place, donated update free of copies, so the protected step costs one
  extra read of the gradients (the norm) over the bare one.
* **The step** is the core's pipeline (``safeopt.adapter.step``) with
  :class:`JaxKernels`; clipping multiplies the gradients by the norm-clip
  scale as the inner update reads them (the multiply fuses into the inner update's loops; no
  clipped copy of the gradients is written).
* **Divergence.** Code under ``jax.jit`` cannot raise, so the counter
  ``consecutive_skips`` in the state is the flag: call
  ``safeopt.check(state)`` at a host boundary (every few steps, or where you
  log) and it raises :class:`safeopt.DivergenceError` once
  ``max_consecutive_skips`` updates in a row were skipped. When ``update``
  runs un-jitted on concrete arrays it raises right away, at the step that
  reaches the limit.
* **Monitoring.** The per-tensor raw gradient norms come with the global norm
  for free; ``names`` are the ``keystr`` of the leaf paths of the tree given
  to ``init`` (a ``flax.nnx`` Variable's trailing ``.value`` dropped), kept
  in :class:`SafeInfo`. The global weight norm (one more read of the
  parameters) is gathered on every ``policy.monitor_every``-th update
  (counting skipped ones, as every adapter does), chosen on the device with
  ``lax.cond`` on the state's own counters (under ``jax.vmap`` a ``cond``
  becomes a select, so batched models pay for it on every step), and on
  every step when the policy needs it (``penalty_when="weights_above"``).

Composition: wrap *outside* ``optax.MultiSteps``
(``safeopt.wrap(optax.MultiSteps(tx, k), policy)``) so that every mini-batch
gradient is checked (and clipped) and a skipped mini-step leaves the
accumulator and the mini-step counter as they were; wrapped inside, safeopt
would only see the averaged gradient, after a NaN had already spoilt the
accumulator. ``optax.chain``,
``optax.inject_hyperparams`` and ``flax.nnx.Optimizer`` (which passes extra
keyword arguments through) work as with any transformation. The unit of
``norm_scope="unitwise"`` is the last axis (JAX kernels are ``(..., in,
out)``), which matches ``optax.adaptive_grad_clip`` for 1-, 2- and 4-d
parameters; for 3-d parameters optax reduces over axis 0 only.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax

import safeopt
import safeopt.adapter as sa
from safeopt import Policy

__all__ = ["JaxKernels", "OptaxAdapter", "SafeInfo", "SafeState", "SafeTransformation",
           "find_state", "safe_transform", "upgrade_state_dict"]

_PATH = "jit"


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


class SafeTransformation(optax.GradientTransformationExtraArgs):
    """What :func:`safe_transform` returns: an ``optax.GradientTransformationExtraArgs``.

    A subclass only so that ``safeopt.wrap`` recognises, and refuses, a second wrap.
    """

    __slots__ = ()


class SafeState(NamedTuple):
    """State of a safeopt-wrapped Optax transformation.

    Attributes:
      safe: safeopt's state (``safeopt.adapter.State``: one part per feature).
      inner: The inner transformation's state.
      info: Policy and parameter names; static (no leaves).
    """

    safe: sa.State
    inner: optax.OptState
    info: SafeInfo


class JaxKernels(sa.Kernels):
    """The core's default kernels on ``jax.numpy``, with ``lax.cond`` for the monitor."""

    def when(self, pred: Any, compute: Any, otherwise: float) -> Any:
        if isinstance(pred, bool):
            return super().when(pred, compute, otherwise)
        return jax.lax.cond(pred, compute, lambda: jnp.asarray(otherwise, jnp.float32))


def safe_transform(inner: Any, policy: sa.PolicyLike = None,
                   ) -> SafeTransformation:
    """Wraps ``inner`` so that every update follows ``policy``.

    Args:
      inner: An Optax ``GradientTransformation`` (or ``optax.MultiSteps``).
      policy: Anything :func:`safeopt.load_policy` accepts.

    Returns:
      A :class:`SafeTransformation` (an ``optax.GradientTransformationExtraArgs``).
      Its ``update(updates, state, params=None, *, value=None, **extra_args)`` takes the loss as
      ``value`` and passes ``value`` and ``extra_args`` on to ``inner``.

    Raises:
      TypeError: ``inner`` is not an Optax transformation.

    Example:
      >>> import jax.numpy as jnp, optax, safeopt
      >>> tx = safeopt.wrap(optax.sgd(0.1), {"clip_norm": 1.0})
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> [round(float(u), 2) for u in updates["w"]]
      [-0.06, -0.08]
    """
    resolved = safeopt.load_policy(policy)
    tx = optax.with_extra_args_support(_as_transformation(inner))
    kernels = JaxKernels(sa.namespace_by_name("jax"))

    def init_fn(params: optax.Params) -> SafeState:
        _register_flax_serialization()
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        names = tuple(_leaf_name(path) for path, _ in paths)
        safe = sa.init_state(kernels.xp, resolved, n_tensors=len(names))
        state = SafeState(safe=safe, inner=tx.init(params), info=SafeInfo(resolved, names))
        return _replicate_like(state, params)

    def update_fn(updates: optax.Updates, state: SafeState, params: optax.Params | None = None,
                  *, value: Any = None, **extra_args: Any) -> tuple[optax.Updates, SafeState]:
        _check_state(state)
        _check_params(resolved, params)
        grads, treedef = _flatten(updates)
        weights = None if params is None else treedef.flatten_up_to(params)
        loss = None if value is None else jnp.asarray(value)
        out = sa.step(kernels, resolved, state.safe, grads, weights, loss)
        skip = _ordered_skip(out)
        if value is not None:
            extra_args["value"] = value

        def apply() -> tuple[optax.Updates, optax.OptState]:
            return tx.update(treedef.unflatten(out.grads), state.inner, params, **extra_args)

        new_updates, kept = skip_select(skip, apply, state.inner)
        new_state = SafeState(safe=out.state, inner=kept, info=state.info)
        _raise_if_concrete_divergence(resolved, new_state)
        return new_updates, new_state

    return SafeTransformation(init_fn, update_fn)


def skip_select(skip: jax.Array, apply: Any, old_state: optax.OptState,
                ) -> tuple[optax.Updates, optax.OptState]:
    """Runs ``apply()`` (an inner update) so that a skipped update never happened.

    Returns ``(where(skip, 0, updates), where(skip, old_state, new_state))``,
    bit for bit, but computed so that XLA keeps the update in place.

    Why not just ``jnp.where`` on the results: the inner update computes its
    updates from its *new* state (Adam's ``mu'``, ``nu'``), and XLA fuses the
    recomputation of ``mu'`` (from the old ``mu``) into the parameter update.
    Once the state output is ``where(skip, mu, mu')``, the parameter update still
    reads the old ``mu`` after the state output has overwritten it in place
    (the buffers are donated), so XLA inserts a full copy of every moment, and
    on CPU fresh full-size buffers cost as much as the whole Adam step.

    So the inner update is traced to a jaxpr and evaluated here with every
    new-state value replaced by its selected value *as soon as it is defined*:
    the updates are then computed from ``where(skip, mu, mu')``, which is
    ``mu'`` whenever the updates are used (not skipped), and XLA reads the
    state output as the bare optimizer does, with no copy.

    Args:
      skip: bool scalar, skip the update.
      apply: A zero-argument function returning ``(updates, new_state)``.
      old_state: The inner state passed to ``apply``.
    """
    closed = jax.make_jaxpr(apply, return_shape=True)
    jaxpr_fn, (upd_shape, state_shape) = closed()
    upd_def = _flatten(upd_shape)[1]
    old_leaves, state_def = _flatten(old_state)
    if _flatten(state_shape)[1] != state_def:
        raise ValueError(
            "The inner transformation's update must return a state with the structure of "
            f"the state it was given. Received: {jax.tree.structure(state_shape)} for "
            f"{state_def}"
        )
    try:
        new_upd, new_state = _eval_selected(jaxpr_fn, skip, old_leaves, upd_def.num_leaves)
    except Exception as err:  # JAX internals moved: stay correct, lose the in-place fusion
        warnings.warn(
            f"safeopt could not fuse the skip into the inner update ({type(err).__name__}: "
            f"{err}); falling back to a plain select, which costs one copy of the state.",
            RuntimeWarning, stacklevel=2)
        return _plain_select(skip, apply, old_state)
    return upd_def.unflatten(new_upd), state_def.unflatten(new_state)


def _plain_select(skip: jax.Array, apply: Any, old_state: optax.OptState,
                  ) -> tuple[optax.Updates, optax.OptState]:
    """``(where(skip, 0, updates), where(skip, old, new))`` without the jaxpr rewrite."""
    updates, new_state = apply()
    updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), updates)
    state = jax.tree.map(lambda o, n: jnp.where(skip, o, n), old_state, new_state)
    return updates, state


def _eval_selected(closed: Any, skip: jax.Array, old: list[Any], n_updates: int,
                   ) -> tuple[list[Any], list[Any]]:
    """Evaluates ``closed`` selecting each state output against ``old`` where defined."""
    jaxpr = closed.jaxpr
    state_vars = jaxpr.outvars[n_updates:]
    uses: dict[Any, int] = {}
    for var in state_vars:
        if not _is_literal(var):
            uses[var] = uses.get(var, 0) + 1
    select_at = {var: i for i, var in enumerate(state_vars)
                 if not _is_literal(var) and uses[var] == 1}
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        return var.val if _is_literal(var) else env[var]

    def write(var: Any, value: Any) -> None:
        index = select_at.get(var)
        env[var] = value if index is None else jnp.where(skip, old[index], value)

    for var, value in zip(jaxpr.constvars, closed.consts):
        write(var, value)
    for eqn in jaxpr.eqns:
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
            ans = eqn.primitive.bind(*map(read, eqn.invars), **params)
        for var, value in zip(eqn.outvars, ans if eqn.primitive.multiple_results else [ans]):
            write(var, value)
    updates = [jnp.where(skip, jnp.zeros_like(v), v) for v in map(read, jaxpr.outvars[:n_updates])]
    state = [read(var) if var in select_at else jnp.where(skip, old[i], read(var))
             for i, var in enumerate(state_vars)]
    return updates, state


def _is_literal(var: Any) -> bool:
    return isinstance(var, jax.extend.core.Literal)


def _as_transformation(inner: Any) -> optax.GradientTransformation:
    if isinstance(inner, optax.MultiSteps):
        return inner.gradient_transformation()
    if isinstance(inner, optax.GradientTransformation):
        return inner
    raise TypeError(
        "`inner` must be an optax.GradientTransformation or optax.MultiSteps. "
        f"Received: inner={type(inner).__qualname__}"
    )


def _replicate_like(state: SafeState, params: Any) -> SafeState:
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


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    """``jax.tree.flatten`` with the tree definition typed ``Any`` (jaxlib has no stubs)."""
    leaves, treedef = jax.tree.flatten(tree)
    return leaves, treedef


def _leaf_name(path: Any) -> str:
    """``keystr`` of a leaf path, without the ``.value`` of a ``flax.nnx`` Variable."""
    name = jax.tree_util.keystr(path)
    return name[: -len(".value")] if name.endswith(".value") else name


def _check_state(state: Any) -> None:
    if not isinstance(state, SafeState):
        raise TypeError(
            "`state` must be the SafeState returned by the wrapped transformation's init "
            f"(or a previous update). Received: state={type(state).__qualname__}"
        )


def _check_params(policy: Policy, params: Any) -> None:
    if policy.needs_params and params is None:
        raise ValueError(
            "`params` must be given to update() when the policy uses an L1/L2 penalty or "
            "norm_scope='unitwise': call tx.update(grads, state, params). Received: params=None"
        )


def _ordered_skip(out: sa.Step) -> jax.Array:
    """The skip flag, made to depend on the monitor's weight-norm ``cond``.

    The value is the decision's, but without that order XLA cannot tell that
    the ``cond`` reads the parameters before the (donated, in-place)
    parameter update overwrites them, and copies every parameter first.
    """
    wnorm = out.stats.weight_norm
    skip = out.decision.skip
    if wnorm is None or isinstance(out.stats.weight_due, bool):
        return skip
    return jnp.logical_or(skip, wnorm < 0.0)  # a norm is never < 0 (NaN < 0 is False)


def _raise_if_concrete_divergence(policy: Policy, state: SafeState) -> None:
    """Raises :class:`safeopt.DivergenceError` when ``update`` ran un-jitted."""
    streak = state.safe.counters.consecutive_skips
    limit = policy.max_consecutive_skips
    if limit is None or isinstance(streak, jax.core.Tracer):
        return
    if int(streak) >= limit:
        safeopt.check(state)


_FLAX_REGISTERED = False


def _register_flax_serialization() -> None:
    """Lets ``flax.serialization`` (if the caller imported it) skip :class:`SafeInfo`."""
    global _FLAX_REGISTERED
    serialization = sys.modules.get("flax.serialization")
    if _FLAX_REGISTERED or serialization is None:
        return
    serialization.register_serialization_state(
        SafeInfo, lambda info: {}, lambda info, state_dict: info, override=True)
    _FLAX_REGISTERED = True


def find_state(obj: Any) -> SafeState | None:
    """Returns the :class:`SafeState` in ``obj``, or ``None``.

    ``obj`` may be the state itself, a state that holds it (``optax.chain``,
    ``optax.MultiSteps`` around the wrapper) or a ``flax.nnx.Optimizer``.
    """
    if isinstance(obj, SafeState):
        return obj
    opt_state = getattr(obj, "opt_state", None)
    if opt_state is not None and type(obj).__module__.startswith("flax"):
        obj = opt_state
    if not isinstance(obj, (tuple, list, dict)):
        return None
    found = [x for x in jax.tree_util.tree_leaves(obj, is_leaf=_is_safe_state)
             if isinstance(x, SafeState)]
    return found[0] if len(found) == 1 else None


def _is_safe_state(x: Any) -> bool:
    return isinstance(x, SafeState)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "get_value"):  # flax.nnx Variable (nnx.Optimizer's state)
        x = x.get_value()
    return np.asarray(jax.device_get(x))


class OptaxAdapter(sa.Adapter):
    """The safeopt adapter for Optax gradient transformations."""

    name = "optax"
    demo = "safeopt_optax.demo"

    def accepts(self, optimizer: Any) -> bool:
        """Optax ``GradientTransformation`` instances and ``optax.MultiSteps``."""
        return isinstance(optimizer, (optax.GradientTransformation, optax.MultiSteps))

    def wrap(self, optimizer: Any, policy: Policy) -> SafeTransformation:
        """Returns :func:`safe_transform` of ``optimizer``."""
        return safe_transform(optimizer, policy)

    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` is a wrapped transformation, or is (or holds one) :class:`SafeState`."""
        return isinstance(obj, SafeTransformation) or find_state(obj) is not None

    def read(self, obj: Any) -> tuple[Policy, sa.State, dict[str, Any]]:
        """Copies safeopt's state to NumPy (one host transfer).

        ``extra["names"]`` are the parameter leaf paths recorded at ``init``.

        Raises:
          ValueError: the state is batched (``jax.vmap`` over models): read one
            model's state, ``jax.tree.map(lambda x: x[i], state)``.
        """
        state = find_state(obj)
        if state is None:
            raise TypeError(
                "`obj` must be the state of a safeopt-wrapped Optax transformation (Optax "
                "transformations are stateless): call safeopt.stats(opt_state). "
                f"Received: obj={type(obj).__qualname__}"
            )
        host = sa.map_state(_to_numpy, state.safe)
        if host.counters.steps.ndim != 0:
            raise ValueError(
                "`state` must hold one model's safeopt state; this one is batched "
                f"(shape {host.counters.steps.shape}, e.g. from jax.vmap). Read one model with "
                "jax.tree.map(lambda x: x[i], state). Received: a batched SafeState"
            )
        extra = {"path": _PATH, "names": list(state.info.names)}
        return state.info.policy, host, extra


def upgrade_state_dict(saved: Any, target: SafeState) -> SafeState:
    """``target`` with the values of a saved state, including one saved by safeopt 0.1.

    Args:
      saved: The saved :class:`SafeState` as a state dict (what
        ``flax.serialization.to_state_dict`` or ``msgpack_restore`` gives:
        ``{"safe": ..., "inner": ..., "info": ...}``).
      target: ``tx.init(params)`` of the same transformation and parameters.

    Returns:
      The restored state. safeopt's part is read from either layout; the
      inner state is restored onto ``target.inner`` with
      ``flax.serialization.from_state_dict`` (flax must be installed).
    """
    from flax import serialization

    safe = dict(saved["safe"])
    flat = sa.upgrade(safe) if sa.is_legacy(safe) else {
        f"{feature}.{field}": value for feature, part in safe.items()
        for field, value in dict(part).items()}
    restored = sa.unflatten(target.safe, flat, lambda v, cur: jnp.asarray(v, cur.dtype))
    inner = serialization.from_state_dict(target.inner, saved["inner"])
    return SafeState(safe=restored, inner=inner, info=target.info)
