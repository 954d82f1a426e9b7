"""The skip as a select inside the traced inner update, so that XLA keeps it in place.

:func:`skip_select` runs an inner Optax update so that a skipped update never
happened (zero updates, the old inner state bit for bit) without the copies a
plain ``jnp.where`` on the results makes XLA insert into a donated, in-place
step.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import optax

__all__ = ["skip_select"]


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


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    """``jax.tree.flatten`` with the tree definition typed ``Any`` (jaxlib has no stubs)."""
    leaves, treedef = jax.tree.flatten(tree)
    return leaves, treedef
