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
* **Recovery** (``recover=True``; :mod:`safeopt_optax._recover`). The last
  good snapshot (a copy of the parameters, of the inner state and of
  safeopt's) rides in the state (``SafeState.snapshot``; no leaves without
  ``recover``), and a restore happens inside the compiled step: the inner
  state and safeopt's come back from the snapshot and the updates are
  ``snapshot - params``. Apply them with :func:`apply_updates`
  (``safeopt_optax.apply_updates(params, updates, state)``), which gives the
  snapshot's parameters back bit for bit, NaN/Inf weights included;
  ``optax.apply_updates`` and ``flax.nnx.Optimizer`` can only add the
  difference, and the next update notices: ``safeopt.stats`` and
  ``safeopt.check`` warn (``restore_missed_at``), an un-jitted ``update``
  raises. The learning-rate back-off multiplies the updates. Once the
  recoveries have run out the update is skipped and the core's sticky flag
  makes ``safeopt.check(state)`` raise, naming them (an un-jitted ``update``
  raises at once).
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

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import safeopt
import safeopt.adapter as sa
from safeopt import Policy
from safeopt_optax import _recover
from safeopt_optax._recover import Snapshot
from safeopt_optax._select import skip_select
from safeopt_optax._state import (
    SafeInfo,
    SafeState,
    register_flax_serialization,
    replicate_like,
    upgrade_state_dict,
)

__all__ = ["JaxKernels", "OptaxAdapter", "SafeInfo", "SafeState", "SafeTransformation",
           "Snapshot", "apply_updates", "find_state", "safe_transform", "skip_select",
           "upgrade_state_dict"]

_PATH = "jit"


class SafeTransformation(optax.GradientTransformationExtraArgs):
    """What :func:`safe_transform` returns: an ``optax.GradientTransformationExtraArgs``.

    A subclass only so that ``safeopt.wrap`` recognises, and refuses, a second wrap.
    """

    __slots__ = ()


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
        register_flax_serialization()
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        names = tuple(_leaf_name(path) for path, _ in paths)
        safe = sa.init_state(kernels.xp, resolved, n_tensors=len(names))
        inner_state = tx.init(params)
        state = SafeState(safe=safe, inner=inner_state, info=SafeInfo(resolved, names),
                          snapshot=_recover.init(resolved, params, inner_state, safe))
        return replicate_like(state, params)

    def update_fn(updates: optax.Updates, state: SafeState, params: optax.Params | None = None,
                  *, value: Any = None, **extra_args: Any) -> tuple[optax.Updates, SafeState]:
        _check_state(state)
        _check_params(resolved, params)
        grads, treedef = _flatten(updates)
        weights = None if params is None else treedef.flatten_up_to(params)
        loss = None if value is None else jnp.asarray(value)
        out = sa.step(kernels, resolved, state.safe, grads, weights, loss)
        held, restore, inner = state.snapshot, None, state.inner
        if isinstance(held, Snapshot):
            assert weights is not None and out.decision.snapshot is not None
            held = _recover.take(held, out.decision.snapshot, weights, state.inner, state.safe)
            restore = _recover.restoring(resolved, out, state.safe)
            inner = _recover.inner_base(restore, held, state.inner)
        skip = _ordered_skip(out)
        if value is not None:
            extra_args["value"] = value

        def apply() -> tuple[optax.Updates, optax.OptState]:
            return tx.update(treedef.unflatten(out.grads), inner, params, **extra_args)

        new_updates, kept = skip_select(skip, apply, inner)
        safe = out.state
        if isinstance(held, Snapshot):
            assert weights is not None and restore is not None
            leaves, safe, held = _recover.finish(out, restore, held, weights,
                                                 _flatten(new_updates)[0])
            new_updates = jax.tree.unflatten(jax.tree.structure(new_updates), leaves)
        new_state = SafeState(safe=safe, inner=kept, info=state.info, snapshot=held)
        _raise_if_concrete(resolved, new_state)
        return new_updates, new_state

    return SafeTransformation(init_fn, update_fn)


def _as_transformation(inner: Any) -> optax.GradientTransformation:
    if isinstance(inner, optax.MultiSteps):
        return inner.gradient_transformation()
    if isinstance(inner, optax.GradientTransformation):
        return inner
    raise TypeError(
        "`inner` must be an optax.GradientTransformation or optax.MultiSteps. "
        f"Received: inner={type(inner).__qualname__}"
    )


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
    if (policy.needs_params or policy.recover) and params is None:
        raise ValueError(
            "`params` must be given to update() when the policy uses an L1/L2 penalty, "
            "norm_scope='unitwise' or recover=True: call tx.update(grads, state, params). "
            "Received: params=None"
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


def _raise_if_concrete(policy: Policy, state: SafeState) -> None:
    """Raises at once when ``update`` ran un-jitted: a divergence, or a missed restore.

    Raises:
      ValueError: the parameters given to this update were not the snapshot
        the previous one restored (see :func:`apply_updates`).
      safeopt.DivergenceError: the run diverged (with no recovery left).
    """
    streak = state.safe.counters.consecutive_skips
    if isinstance(streak, jax.core.Tracer):
        return
    missed = _recover.missed_restore(state.snapshot)
    if missed is not None:
        raise ValueError(_recover.missed_text(missed))
    rec = state.safe.recovery
    limit = policy.max_consecutive_skips
    if (limit is not None and int(streak) >= limit) or (
            not isinstance(rec, sa.Empty) and int(rec.exhausted)):
        safeopt.check(state)


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


def apply_updates(params: optax.Params, updates: optax.Updates, state: Any) -> optax.Params:
    """``optax.apply_updates``, with the snapshot's parameters, bit for bit, on a restore.

    Required with ``recover=True``: a restore returns the updates ``snapshot -
    params``, which ``optax.apply_updates`` adds in floating point, so the
    parameters come back only approximately, and a NaN/Inf weight not at all.
    This function takes the snapshot's parameters instead whenever the update
    that returned ``state`` restored it (a select: one read of the held
    parameters, fused into the parameter update). The next update checks that
    it did (see :mod:`safeopt_optax._recover`). Without ``recover`` it is
    ``optax.apply_updates``.

    Args:
      params: The parameters given to ``update``.
      updates: The updates it returned.
      state: The state it returned (or a state holding it: ``optax.chain``...).

    Returns:
      The new parameters.

    Raises:
      TypeError: ``state`` holds no (or more than one) safeopt state.

    Example:
      >>> import jax.numpy as jnp, optax, safeopt, safeopt_optax
      >>> tx = safeopt.wrap(optax.sgd(0.1), {"recover": True, "clip_norm": None})
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
      >>> params = safeopt_optax.apply_updates(params, updates, state)
      >>> [round(float(w), 2) for w in params["w"]]
      [0.9, 0.9]
    """
    found = find_state(state)
    if found is None:
        raise TypeError(
            "`state` must be the state a safeopt-wrapped transformation's update returned "
            "with these updates (or a state holding one, e.g. optax.chain's). "
            f"Received: state={type(state).__qualname__}")
    new_params = optax.apply_updates(params, updates)
    if not isinstance(found.snapshot, Snapshot):
        return new_params
    return _recover.exact(params, new_params, found.snapshot)


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
        extra: dict[str, Any] = {"path": _PATH, "names": list(state.info.names)}
        missed = _recover.missed_restore(state.snapshot)
        if missed is not None:
            extra["restore_missed_at"] = missed
            warnings.warn(_recover.missed_text(missed), RuntimeWarning, stacklevel=4)
        return state.info.policy, host, extra
