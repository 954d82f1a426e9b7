"""The ``"host"`` namespace: NumPy with every 0-d value held as a NumPy scalar."""

from __future__ import annotations

import math
from typing import Any

from safeopt._xp_base import Array, _NumPy


class _Host(_NumPy):
    """NumPy with every 0-d value held as a NumPy scalar (``np.float32``, ...).

    For decisions taken on the host (a CPU training step), where the policy
    math runs on a handful of scalars and a few short vectors: an operation on
    NumPy scalars costs a tenth of the same ufunc on 0-d arrays, and keeps
    NumPy's float32 arithmetic (the results are bit-identical to the
    ``"numpy"`` namespace's; the tests check it). Vectors stay NumPy arrays.
    Scalar fast paths fall back to NumPy whenever an operand is an array or
    the result type is not plain, so NumPy's promotion rules always hold.
    """

    name = "host"

    def __init__(self, module: Any) -> None:
        super().__init__(module)
        self._nd = module.ndarray
        self._real_types = (module.floating, module.integer, float, int)
        self._typed_scalars = frozenset({module.float32, module.float64, module.int32,
                                         module.int64, module.bool_})
        self._flags = frozenset({module.bool_, bool})
        self._true, self._false = module.True_, module.False_

    def _scalar(self, a: Any, b: Any = None, c: Any = None) -> bool:
        """No operand is an array (the others are NumPy scalars or Python numbers)."""
        nd = self._nd
        return not (isinstance(a, nd) or isinstance(b, nd) or isinstance(c, nd))

    def _real(self, a: Any, b: Any = 0) -> bool:
        real = self._real_types
        return (isinstance(a, real) and isinstance(b, real)
                and not isinstance(a, bool) and not isinstance(b, bool))

    def _flag(self, value: Any) -> Any:
        return self._true if value else self._false

    def asarray(self, value: Any, dtype: Any, like: Array | None = None) -> Array:
        if not isinstance(value, (list, tuple)) and self._scalar(value):
            return dtype(value)
        return _unwrap(self.m.asarray(value, dtype=dtype))

    def zeros(self, shape: tuple[int, ...], dtype: Any, like: Array | None = None) -> Array:
        return dtype(0) if shape == () else self.m.zeros(shape, dtype=dtype)

    def full_like(self, like: Array | None, value: float, dtype: Any) -> Array:
        return dtype(value)

    def astype(self, x: Array, dtype: Any) -> Array:
        if type(x) is dtype:
            return x
        if self._scalar(x):
            return dtype(x)
        return _unwrap(self.m.asarray(x).astype(dtype))

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        kind = type(a)
        if type(cond) in self._flags and kind is type(b):
            if kind in self._typed_scalars:
                return a if cond else b  # the common case: two scalars of one NumPy type
            if kind is self._nd and a.shape == b.shape and a.dtype == b.dtype:
                return a if cond else b  # arrays are never written in place here
        if self._scalar(cond, a, b):
            picked, other = (a, b) if cond else (b, a)
            typed = self._typed(picked, other)
            if typed is not None:
                return typed
        return _unwrap(self.m.where(cond, a, b))

    def sqrt(self, x: Array) -> Array:
        if type(x) is self.m.float32:  # sqrt is correctly rounded in float64 and float32
            return self.m.float32(math.sqrt(x) if x >= 0 else math.nan)
        return _unwrap(self.m.sqrt(x))

    def abs(self, x: Array) -> Array:
        return abs(x) if self._scalar(x) else self.m.abs(x)

    def isfinite(self, x: Array) -> Array:
        if type(x) is self.m.float32 or self._real(x):
            return self._flag(math.isfinite(x))
        return _unwrap(self.m.isfinite(x))

    def minimum(self, a: Array, b: Array) -> Array:
        if self._real(a, b):
            picked, other = (b, a) if b != b or (a == a and b < a) else (a, b)
            typed = self._typed(picked, other)
            if typed is not None:
                return typed
        return _unwrap(self.m.minimum(a, b))

    def maximum(self, a: Array, b: Array) -> Array:
        if self._real(a, b):
            picked, other = (b, a) if b != b or (a == a and b > a) else (a, b)
            typed = self._typed(picked, other)
            if typed is not None:
                return typed
        return _unwrap(self.m.maximum(a, b))

    def logical_and(self, a: Array, b: Array) -> Array:
        if self._scalar(a, b):
            return self._flag(a and b)
        return _unwrap(self.m.logical_and(a, b))

    def logical_or(self, a: Array, b: Array) -> Array:
        if self._scalar(a, b):
            return self._flag(a or b)
        return _unwrap(self.m.logical_or(a, b))

    def logical_not(self, a: Array) -> Array:
        if self._scalar(a):
            return self._flag(not a)
        return _unwrap(self.m.logical_not(a))

    def max(self, x: Array) -> Array:
        return _unwrap(self.m.max(x))

    def stack(self, xs: list[Array]) -> Array:
        if not any(isinstance(x, self._nd) for x in xs):
            return self.m.array(xs)  # scalars: a tenth of the cost of np.stack
        return self.m.stack(xs)

    def sum(self, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        return _unwrap(self.m.sum(x, axis=axis, keepdims=keepdims))

    def any(self, x: Array) -> Array:
        return _unwrap(self.m.any(x))

    def _typed(self, picked: Any, other: Any) -> Any:
        """``picked`` with the type NumPy's array result would have, or None if unsure.

        Two NumPy scalars of one type keep it; a Python number beside a NumPy
        scalar takes the scalar's type where NEP 50 says it does (an int
        beside any number, a float beside a float). Anything else is left to
        NumPy.
        """
        generic = self.m.generic
        picked_np, other_np = isinstance(picked, generic), isinstance(other, generic)
        if picked_np and other_np:
            return picked if type(picked) is type(other) else None
        if picked_np and self._weak_fits(other, picked):
            return picked
        if other_np and self._weak_fits(picked, other):
            return type(other)(picked)
        return None

    def _weak_fits(self, python: Any, typed: Any) -> bool:
        if isinstance(typed, self.m.bool_):
            return isinstance(python, bool)
        if isinstance(python, float):
            return isinstance(typed, self.m.floating)
        return isinstance(python, (bool, int))


def _unwrap(x: Any) -> Any:
    """A 0-d ndarray as its NumPy scalar; anything else as it is."""
    return x[()] if getattr(x, "ndim", None) == 0 and hasattr(x, "dtype") else x
