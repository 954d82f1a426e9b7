"""The core's kernels for Keras: the default ones on the backend's namespace, with ``ops.cond``."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

import safeopt.adapter as sa


class KerasKernels(sa.Kernels):
    """The core's default kernels on the backend's namespace, with ``ops.cond``."""

    def when(self, pred: Any, compute: Any, otherwise: float) -> Any:
        if isinstance(pred, bool):
            return super().when(pred, compute, otherwise)
        fallback = ops.convert_to_tensor(otherwise, "float32")
        return ops.cond(pred, compute, lambda: fallback)


def value_of(x: Any) -> Any:
    """The value of a Keras variable (read in a ``StatelessScope`` if in one), else ``x``."""
    return ops.convert_to_tensor(x) if isinstance(x, keras.Variable) else x
