"""The registry's entry point for Keras 3: ``safeopt.wrap`` / ``safeopt.stats``."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

import safeopt
from safeopt import Policy, PolicyState
from safeopt_keras._optimizer import SafeOptimizer


class KerasAdapter(safeopt.Adapter):
    """Wraps Keras 3 optimizers into :class:`SafeOptimizer` (any backend)."""

    name = "keras"

    def accepts(self, optimizer: Any) -> bool:
        """Keras 3 optimizers (``keras.optimizers.Optimizer``)."""
        return isinstance(optimizer, keras.optimizers.Optimizer)

    def wrap(self, optimizer: Any, policy: Policy) -> SafeOptimizer:
        """Returns a :class:`SafeOptimizer` that owns ``optimizer``."""
        return SafeOptimizer(optimizer, policy)

    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` is a :class:`SafeOptimizer`."""
        return isinstance(obj, SafeOptimizer)

    def read(self, obj: Any) -> tuple[Policy, PolicyState, dict[str, Any]]:
        """Reads the policy state from the optimizer's variables (a host read).

        Before the first step (optimizer not built) the initial state is returned.
        """
        backend = keras.backend.backend()
        extra: dict[str, Any] = {"path": f"{backend}-cond", "backend": backend,
                                 "inner": type(obj.inner_optimizer).__name__}
        if not obj.built:
            state = safeopt.init_state(safeopt.namespace_by_name("numpy"), obj.policy)
            return obj.policy, state, {**extra, "names": []}
        values = {f: _to_host(v) for f, v in obj.state_variables()._asdict().items()}
        extra["names"] = [v.path for v in obj._trainable_variables]
        extra["iterations"] = int(_to_host(obj.iterations))
        return obj.policy, PolicyState(**values), extra


def _to_host(variable: Any) -> np.ndarray:
    """A Keras variable's value as a NumPy array, by each backend's own copy.

    ``keras.ops.convert_to_numpy(variable)`` goes through ``__array__``
    without the ``copy`` keyword, which NumPy 2 deprecates.
    """
    value = variable.value
    if hasattr(value, "detach"):  # torch
        return np.asarray(value.detach().cpu().numpy())
    if hasattr(value, "numpy"):  # tensorflow
        return np.asarray(value.numpy())
    return np.asarray(value)  # jax
