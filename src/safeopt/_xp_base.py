"""The array namespace's base class, and NumPy's (the reference).

safeopt's policy math is written once against the handful of operations of
:class:`Namespace` (the Array API spelling: ``where``, ``sqrt``,
``isfinite``, ...); :mod:`safeopt._xp` finds the namespace of each
framework's arrays.
"""

from __future__ import annotations

from typing import Any

Array = Any


class Namespace:
    """The operations the policy math uses, on one framework's arrays.

    The default implementations follow the Array API standard and serve
    NumPy (2.x) and ``jax.numpy`` as they are; torch and TensorFlow override
    where their spelling differs.
    """

    name = "array_api"

    def __init__(self, module: Any) -> None:
        self.m = module
        self.float32 = module.float32
        self.int32 = module.int32
        self.bool = module.bool

    # creation -------------------------------------------------------------
    def asarray(self, value: Any, dtype: Any, like: Array | None = None) -> Array:
        return self.m.asarray(value, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any, like: Array | None = None) -> Array:
        return self.m.zeros(shape, dtype=dtype)

    def full_like(self, like: Array | None, value: float, dtype: Any) -> Array:
        """A 0-d array of ``value`` on ``like``'s device, made on the device (no copy)."""
        return self.m.full((), value, dtype=dtype)

    def arange(self, n: int, like: Array | None = None) -> Array:
        return self.m.arange(n, dtype=self.int32)

    # elementwise ------------------------------------------------------------
    def astype(self, x: Array, dtype: Any) -> Array:
        return self.m.astype(x, dtype)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        return self.m.where(cond, a, b)

    def sqrt(self, x: Array) -> Array:
        return self.m.sqrt(x)

    def abs(self, x: Array) -> Array:
        return self.m.abs(x)

    def sign(self, x: Array) -> Array:
        return self.m.sign(x)

    def isfinite(self, x: Array) -> Array:
        return self.m.isfinite(x)

    def minimum(self, a: Array, b: Array) -> Array:
        return self.m.minimum(a, b)

    def maximum(self, a: Array, b: Array) -> Array:
        return self.m.maximum(a, b)

    def clip(self, x: Array, low: float, high: float) -> Array:
        return self.m.clip(x, low, high)

    def logical_and(self, a: Array, b: Array) -> Array:
        return self.m.logical_and(a, b)

    def logical_or(self, a: Array, b: Array) -> Array:
        return self.m.logical_or(a, b)

    def logical_not(self, a: Array) -> Array:
        return self.m.logical_not(a)

    # reductions and shape -----------------------------------------------------
    def sum(self, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        return self.m.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Array) -> Array:
        return self.m.max(x)

    def any(self, x: Array) -> Array:
        return self.m.any(x)

    def stack(self, xs: list[Array]) -> Array:
        return self.m.stack(xs)

    def concat(self, xs: list[Array]) -> Array:
        return self.m.concat(xs)

    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array:
        return self.m.reshape(x, shape)

    def sort(self, x: Array) -> Array:
        return self.m.sort(x)

    def ndim(self, x: Array) -> int:
        return len(x.shape)


class _NumPy(Namespace):
    name = "numpy"

    def astype(self, x: Array, dtype: Any) -> Array:
        return self.m.asarray(x).astype(dtype)

    def max(self, x: Array) -> Array:  # keep 0-d arrays, never NumPy scalars
        return self.m.asarray(self.m.max(x))

    def sum(self, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        return self.m.asarray(self.m.sum(x, axis=axis, keepdims=keepdims))

    def any(self, x: Array) -> Array:
        return self.m.asarray(self.m.any(x))

    def full_like(self, like: Array | None, value: float, dtype: Any) -> Array:
        return self.m.asarray(value, dtype=dtype)
