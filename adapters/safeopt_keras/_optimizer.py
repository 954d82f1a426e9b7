"""``SafeOptimizer``: a Keras 3 optimizer that wraps another one.

Modelled on Keras's own ``LossScaleOptimizer``: it builds and owns the inner
optimizer, forwards ``learning_rate`` and ``iterations`` to it, skips with
``ops.cond`` (a plain Python ``if`` on the torch backend, where Keras runs
eagerly), implements ``stateless_apply`` for the JAX trainer and nests the
inner optimizer in ``get_config``.

Every step runs the core's pipeline (``safeopt.adapter.step``: non-finite
check, penalty, value clip, norm clip, decision) with the default kernels on
the backend's own array namespace and tensors, inside the compiled step, and
hands the protected gradients to the inner optimizer only when the step is
not skipped. Variables without a gradient are left out (no penalty, no share
of the norm). safeopt's state lives in non-trainable optimizer variables,
one per field of each feature in use, created in :meth:`SafeOptimizer.build`,
so that ``model.save`` writes it and ``keras.models.load_model`` restores it
(``.keras`` files written by safeopt 0.1 load too).

On the TensorFlow backend under a ``tf.distribute`` strategy the wrapper
decides on all-reduced gradients (:mod:`safeopt_keras._distribute`). With
``recover=True`` it keeps the last good snapshot in optimizer variables and
restores it inside the step (:mod:`safeopt_keras._recover`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops
from keras.src.utils import tracking

import safeopt
import safeopt.adapter as sa
from safeopt import Policy
from safeopt_keras import _distribute, _loss, _saving
from safeopt_keras._checks import check_inner
from safeopt_keras._kernels import KerasKernels, value_of
from safeopt_keras._recover import Snapshot, backed_off


@keras.saving.register_keras_serializable(package="safeopt")
class SafeOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer whose every step follows a safeopt policy.

    Built by ``safeopt.wrap(keras_optimizer, policy)``. It skips updates that
    carry NaN/Inf, adds the L1/L2 penalty, clips by value and by norm (global,
    per tensor or unitwise), all decided inside the compiled step; a skipped
    step leaves the weights, the inner optimizer's variables and its
    ``iterations`` untouched.

    Clipping is never applied twice: an inner optimizer with ``clipnorm``,
    ``clipvalue`` or ``global_clipnorm`` is refused, with the policy keys to
    use instead. An inner ``loss_scale_factor`` is taken over (the wrapper
    unscales the gradients before it decides).

    With ``recover=True`` it also keeps the last good snapshot of the
    weights, of the inner optimizer's variables and of safeopt's state in
    variables of its own (one more copy of the weights and of the inner
    optimizer's slots, on the device, saved with the model), restores it bit
    for bit inside the step when the run diverges, and backs the learning rate
    off (see :mod:`safeopt_keras._recover`).

    Args:
      inner_optimizer: The ``keras.optimizers.Optimizer`` to wrap (built by
        the wrapper).
      policy: Anything :func:`safeopt.load_policy` accepts.
      name: The optimizer's name.
      loss_scale_factor: Constant loss scale (taken over from the inner
        optimizer by :func:`safeopt.wrap`).

    Example:
      >>> import keras, safeopt
      >>> opt = safeopt.wrap(keras.optimizers.Adam(1e-3), {"clip_norm": 1.0})
      >>> isinstance(opt, keras.optimizers.Optimizer)
      True
    """

    def __init__(self, inner_optimizer: Any, policy: Any = None, name: str | None = None,
                 loss_scale_factor: float | None = None, **kwargs: Any) -> None:
        check_inner(inner_optimizer, SafeOptimizer)
        if kwargs:
            raise ValueError(
                "SafeOptimizer takes no other optimizer arguments: set them on the inner "
                f"optimizer. Received: {sorted(kwargs)}"
            )
        super().__init__(learning_rate=0.0, name=name, loss_scale_factor=loss_scale_factor)
        self.inner_optimizer = inner_optimizer
        if inner_optimizer.loss_scale_factor is not None:
            # Taken over, as LossScaleOptimizer does: the wrapper unscales first.
            self.loss_scale_factor = inner_optimizer.loss_scale_factor
            inner_optimizer.loss_scale_factor = None
        self.policy: Policy = safeopt.load_policy(policy)
        self._kernels = KerasKernels(sa.namespace_by_name(keras.backend.backend()))
        self._slots: dict[str, int] = {}
        self._snapshot: Snapshot | None = None  # with recover, once built
        self._n_base = len(self._variables)  # the base optimizer's own (iterations, lr)

    # -- building ---------------------------------------------------------------
    @tracking.no_automatic_dependency_tracking
    def build(self, var_list: Sequence[Any]) -> None:
        """Builds the inner optimizer, one variable per field of safeopt's state, the snapshot.

        With ``recover`` the snapshot's copies (see :mod:`safeopt_keras._recover`)
        come after safeopt's state among the wrapper's own variables.
        """
        if self.built:
            return
        var_list = list(var_list)
        initial = self._initial_state(len(var_list))
        for key, value in sa.flatten(initial).items():
            value = np.asarray(value)
            self._slots[key] = len(self._variables)
            self.add_variable(shape=value.shape, initializer=value, dtype=str(value.dtype),
                              aggregation="only_first_replica", name=key.replace(".", "_"))
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        if self.policy.recover:
            self._snapshot = Snapshot(self, var_list, initial)
        super().build(var_list)

    def _initial_state(self, n_tensors: int) -> sa.State:
        return sa.init_state(sa.namespace_by_name("numpy"), self.policy, n_tensors=n_tensors)

    @property
    def variables(self) -> list[Any]:
        """The wrapper's variables (safeopt's state, the snapshot), then the inner's."""
        return self._variables + self.inner_optimizer.variables

    def state_variables(self) -> sa.State:
        """safeopt's state as the Keras variables that hold it."""
        return sa.unflatten(self._initial_state(len(self._trainable_variables)),
                            {key: self._variables[i] for key, i in self._slots.items()},
                            lambda var, _: var)

    # -- forwarding ---------------------------------------------------------------
    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def scale_loss(self, loss: Any) -> Any:
        """Scales the loss (``loss_scale_factor``) and keeps it for the coming step.

        Keras 3's trainers call this with the loss on every training step,
        before taking the gradients, on every backend; the step that follows
        hands it to the policy when it is not given one (see
        :mod:`safeopt_keras._loss`).
        """
        return super().scale_loss(_loss.put(self, loss))

    # -- the protected step: shared part -----------------------------------------
    def _aligned(self, grads: Sequence[Any], variables: Sequence[Any]) -> list[Any]:
        """Gradients in the order the optimizer was built with (``None`` where absent)."""
        if len(variables) == len(self._trainable_variables) and all(
            a is b for a, b in zip(variables, self._trainable_variables)
        ):
            return list(grads)
        full: list[Any] = [None] * len(self._trainable_variables)
        for g, v in zip(grads, variables):
            full[self._get_variable_index(v)] = g
        return full

    def _protect(self, grads: list[Any], params: list[Any], state: sa.State,
                 loss: Any) -> tuple[list[Any], Any, sa.State]:
        """Runs the core's pipeline on the variables that have a gradient."""
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = [grads[i] for i in present]
        if self.loss_scale_factor is not None:
            dense = [g / self.loss_scale_factor for g in dense]
        out = sa.step(self._kernels, self.policy, state, dense, [params[i] for i in present],
                      loss, positions=present, n_tensors=len(params))
        new_grads: list[Any] = [None] * len(grads)
        for i, g in zip(present, out.grads):
            new_grads[i] = g
        return new_grads, out.decision, out.state

    def _assign_state(self, old: sa.State, new: sa.State) -> None:
        """Writes the fields the step changed (untouched fields keep their identity)."""
        variables = sa.flatten(self.state_variables())
        before = sa.flatten(old)
        for key, value in sa.flatten(new).items():
            if value is not before[key]:
                variables[key].assign(value)

    def _read_state(self) -> sa.State:
        return sa.map_state(ops.convert_to_tensor, self.state_variables())

    # -- stateful apply (TensorFlow, torch, eager JAX) ---------------------------
    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None,
              *, loss: Any = None) -> None:
        """Applies ``grads`` under the policy.

        ``loss`` is this step's loss; when it is not given, the loss last handed
        to :meth:`scale_loss` is used (that is how ``model.fit`` passes it).
        """
        grads = list(grads)
        loss = _loss.take(self) if loss is None else loss
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "`trainable_variables` must be given on the first call, or the optimizer "
                    "built with `optimizer.build(trainable_variables)`. Received: None"
                )
            variables = list(self._trainable_variables)
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
        grads = self._aligned(grads, variables)
        backend = keras.backend.backend()
        if backend == "jax":
            self._jax_stateful_apply(grads, loss)
        elif backend == "tensorflow":
            _distribute.tf_apply(self, grads, loss)
        else:
            skip = self._common_apply(grads, loss)
            if backend == "torch" and bool(skip):  # torch is eager: ops.cond read it already
                self._raise_if_diverged_eagerly()

    def apply_gradients(self, grads_and_vars: Any, *, loss: Any = None) -> Any:
        """Applies ``(gradient, variable)`` pairs under the policy."""
        grads, variables = zip(*grads_and_vars)
        self.apply(grads, variables, loss=loss)
        return self.iterations

    def _params(self) -> list[Any]:
        return [ops.convert_to_tensor(v) for v in self._trainable_variables]

    def _common_apply(self, grads: list[Any], loss: Any) -> Any:
        """The stateful step (TensorFlow without a strategy, torch); returns the skip flag."""
        state = self._read_state()
        new_grads, decision, new_state = self._protect(grads, self._params(), state, loss)
        variables = list(self._trainable_variables)

        def step() -> None:
            self.inner_optimizer.apply(new_grads, variables)

        if self._snapshot is not None:
            return self._snapshot.apply(self, state, decision, new_state, step)
        self._assign_state(state, new_state)
        ops.cond(decision.skip, lambda: None, step)
        return decision.skip

    def _raise_if_diverged_eagerly(self) -> None:
        """torch runs eagerly and has just read ``skip``: raise at once when diverging.

        That is when the skip streak reached ``max_consecutive_skips`` (with
        ``recover``, only once no recovery is left), or when an update
        recovered with no snapshot or no recovery left (``exhausted``).
        """
        limit = self.policy.max_consecutive_skips
        state = self.state_variables()
        reads = [] if limit is None else [state.counters.consecutive_skips]
        if not isinstance(state.recovery, sa.Empty):
            reads.append(state.recovery.exhausted)
        if not reads:
            return
        values = [int(v) for v in ops.convert_to_numpy(ops.stack(
            [ops.cast(ops.convert_to_tensor(v), "int32") for v in reads]))]
        if (limit is not None and values[0] >= limit) or (
                not isinstance(state.recovery, sa.Empty) and values[-1]):
            safeopt.check(self)

    # -- JAX ------------------------------------------------------------------------
    def stateless_apply(self, optimizer_variables: Sequence[Any], grads: Sequence[Any],
                        trainable_variables: Sequence[Any], *, loss: Any = None,
                        ) -> tuple[list[Any], list[Any]]:
        """The functional step the JAX trainer calls (skips with ``ops.cond``).

        Without ``loss``, the loss last handed to :meth:`scale_loss` is used.
        """
        loss = _loss.take(self) if loss is None else loss
        if not self.built:
            raise ValueError(
                f"To call `stateless_apply`, {type(self).__name__} must be built (i.e. its "
                "variables must have been created). You can build it via "
                "`optimizer.build(trainable_variables)`."
            )
        n_own = len(self._variables)
        if len(optimizer_variables) != n_own + len(self.inner_optimizer.variables):
            raise ValueError(
                "`optimizer_variables` must match `optimizer.variables` one to one. Received "
                f"{len(optimizer_variables)} values for "
                f"{n_own + len(self.inner_optimizer.variables)} variables."
            )
        # Values, or Keras variables read in a StatelessScope (LossScaleOptimizer passes those).
        own = [value_of(v) for v in optimizer_variables[:n_own]]
        inner_values = [value_of(v) for v in optimizer_variables[n_own:]]
        params = [value_of(v) for v in trainable_variables]
        state = sa.unflatten(self._initial_state(len(params)),
                             {key: own[i] for key, i in self._slots.items()}, lambda v, _: v)
        new_grads, decision, new_state = self._protect(list(grads), params, state, loss)
        if self._snapshot is not None:
            inner_values, params, new_state = self._snapshot.stateless(
                own, inner_values, params, state, decision, new_state)
        for key, value in sa.flatten(new_state).items():
            own[self._slots[key]] = value

        def step() -> tuple[list[Any], list[Any]]:
            with backed_off(self.inner_optimizer, decision.lr_factor):
                new_params, new_inner = self.inner_optimizer.stateless_apply(
                    inner_values, new_grads, params)
            return list(new_params), list(new_inner)

        new_params, new_inner = ops.cond(decision.skip, lambda: (params, inner_values), step)
        return list(new_params), own + list(new_inner)

    def _jax_stateful_apply(self, grads: list[Any], loss: Any) -> None:
        values = [v.value for v in self.variables]
        params = [v.value for v in self._trainable_variables]
        new_params, new_values = self.stateless_apply(values, grads, params, loss=loss)
        for var, value in zip(self._trainable_variables, new_params):
            var.assign(value)
        for var, value in zip(self.variables, new_values):
            var.assign(value)

    # -- saving ---------------------------------------------------------------------
    def save_own_variables(self, store: Any) -> None:
        """Saves the variables (the recovery snapshot among them), marked with the layout."""
        super().save_own_variables(store)
        store[_saving.LAYOUT_KEY] = np.int32(_saving.LAYOUT)

    def load_own_variables(self, store: Any) -> None:
        """Loads saved variables, from this version's layout or an earlier one."""
        _saving.load(self, store)

    def get_config(self) -> dict[str, Any]:
        """The wrapper's config, with the inner optimizer nested."""
        return {
            "name": self.name,
            "inner_optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "policy": self.policy.to_dict(),
            "loss_scale_factor": self.loss_scale_factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> SafeOptimizer:
        """Rebuilds the wrapper (and its inner optimizer) from :meth:`get_config`."""
        config = dict(config)
        inner = keras.optimizers.deserialize(config.pop("inner_optimizer"),
                                             custom_objects=custom_objects)
        return cls(inner, **config)
