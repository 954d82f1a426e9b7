"""The registry's entry point for Keras 3: ``safeopt.wrap`` / ``safeopt.stats``."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_keras._optimizer import SafeOptimizer


class KerasAdapter(sa.Adapter):
    """Wraps Keras 3 optimizers into :class:`SafeOptimizer` (any backend)."""

    name = "keras"
    demo = "safeopt_keras.demo"

    def accepts(self, optimizer: Any) -> bool:
        """Keras 3 optimizers (``keras.optimizers.Optimizer``)."""
        return isinstance(optimizer, keras.optimizers.Optimizer)

    def wrap(self, optimizer: Any, policy: Policy) -> SafeOptimizer:
        """Returns a :class:`SafeOptimizer` that owns ``optimizer``."""
        return SafeOptimizer(optimizer, policy)

    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` is a :class:`SafeOptimizer`."""
        return isinstance(obj, SafeOptimizer)

    def read(self, obj: Any) -> tuple[Policy, sa.State, dict[str, Any]]:
        """Reads the policy state from the optimizer's variables (a host read).

        Before the first step (optimizer not built) the initial state is returned.
        """
        backend = keras.backend.backend()
        extra: dict[str, Any] = {"path": f"{backend}-cond", "backend": backend,
                                 "inner": type(obj.inner_optimizer).__name__}
        if not obj.built:
            state = sa.init_state(sa.namespace_by_name("numpy"), obj.policy)
            return obj.policy, state, {**extra, "names": []}
        extra["names"] = [v.path for v in obj._trainable_variables]
        extra["iterations"] = int(_to_host(obj.iterations))
        return obj.policy, sa.map_state(_to_host, obj.state_variables()), extra


def _to_host(variable: Any) -> np.ndarray:
    """A copy of a Keras variable's value as a NumPy array, by each backend's own means.

    ``keras.ops.convert_to_numpy(variable)`` goes through ``__array__``
    without the ``copy`` keyword, which NumPy 2 deprecates. A copy: on the
    torch backend ``.numpy()`` shares the variable's memory, which the next
    step overwrites in place.
    """
    value = variable.value
    if hasattr(value, "detach"):  # torch
        return np.array(value.detach().cpu().numpy())
    if hasattr(value, "numpy"):  # tensorflow
        return np.array(value.numpy())
    return np.array(value)  # jax
