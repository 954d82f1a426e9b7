"""Shared pieces of the Keras adapter tests: a small model, batches, compiled steps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np

BACKEND = keras.backend.backend()
F32 = np.float32


def mlp(seed: int = 0, regularizer: Any = None) -> Any:
    """A 6-8-1 tanh MLP, the same weights for the same seed."""
    keras.utils.set_random_seed(seed)
    # Non-zero biases: the subgradient of |w| at 0 is 0 in TF and torch but 1 in JAX.
    reg = {"kernel_regularizer": regularizer, "bias_regularizer": regularizer,
           "bias_initializer": "random_normal"}
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="tanh", **reg),
        keras.layers.Dense(1, **reg),
    ])


def data(n_batches: int, batch: int = 8, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of shape ``(n_batches, batch, 6)`` and ``(n_batches, batch, 1)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_batches, batch, 6)).astype(F32) * 3.0
    y = rng.normal(size=(n_batches, batch, 1)).astype(F32) * 5.0
    return x, y


def fit(model: Any, optimizer: Any, x: np.ndarray, y: np.ndarray, keep: Sequence[int],
        steps_per_execution: int = 1, jit_compile: Any = "auto",
        callbacks: Sequence[Any] = ()) -> Any:
    """Trains on batches ``keep`` of ``(x, y)``, in that order, one epoch."""
    if not model.compiled:
        model.compile(optimizer=optimizer, loss="mse", steps_per_execution=steps_per_execution,
                      jit_compile=jit_compile)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in keep:
            yield x[i], y[i]

    return model.fit(batches(), steps_per_epoch=len(keep), epochs=1, verbose=0,
                     callbacks=list(callbacks))


def numpy(values: Sequence[Any]) -> list[np.ndarray]:
    """Copies of Keras variables or tensors as NumPy arrays."""
    return [np.array(keras.ops.convert_to_numpy(v)) for v in values]


def assert_bit_equal(got: Sequence[np.ndarray], want: Sequence[np.ndarray], what: str) -> None:
    """Same arrays, dtype and shape, element for element (NaN equals NaN)."""
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}[{i}]", strict=True)


def compiled_apply(opt: Any, variables: list[Any]) -> Any:
    """``apply(grads, loss)`` compiled: in a ``tf.function`` (TensorFlow), ``stateless_apply``
    under ``jax.jit`` (JAX)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda grads, loss: opt.apply(grads, variables, loss=loss))
    import jax

    @jax.jit
    def pure(opt_values: list[Any], params: list[Any], grads: list[Any], loss: Any) -> Any:
        return opt.stateless_apply(opt_values, grads, params, loss=loss)

    def apply(grads: list[Any], loss: Any) -> None:
        new_params, new_opt = pure([v.value for v in opt.variables],
                                   [v.value for v in variables], grads, loss)
        for var, value in zip(list(variables) + opt.variables, new_params + new_opt):
            var.assign(value)

    return apply
