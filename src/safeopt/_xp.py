"""A small array namespace over NumPy, torch, JAX and TensorFlow.

safeopt's policy math is written once against the handful of operations
below (the Array API spelling: ``where``, ``sqrt``, ``isfinite``, ...), and
runs unchanged, and without host synchronisation, on each framework's own
arrays. Like einops' ``_backends``, a namespace is looked up from the
arrays' types and a framework is never imported here: it is read from
``sys.modules`` once the caller has imported it.
"""

from __future__ import annotations

import math
import sys
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

    def take(self, x: Array, index: Array) -> Array:
        return self.m.take(x, index)

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

    def take(self, x: Array, index: Array) -> Array:
        return self.m.asarray(self.m.take(x, index))


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

    def take(self, x: Array, index: Array) -> Array:
        return _unwrap(self.m.take(x, index))

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


class _Torch(Namespace):
    name = "torch"

    def asarray(self, value: Any, dtype: Any, like: Array | None = None) -> Array:
        device = None if like is None else like.device
        return self.m.as_tensor(value, dtype=dtype, device=device)

    def zeros(self, shape: tuple[int, ...], dtype: Any, like: Array | None = None) -> Array:
        device = None if like is None else like.device
        return self.m.zeros(shape, dtype=dtype, device=device)

    def arange(self, n: int, like: Array | None = None) -> Array:
        device = None if like is None else like.device
        return self.m.arange(n, dtype=self.int32, device=device)

    def astype(self, x: Array, dtype: Any) -> Array:
        return x.to(dtype)

    def clip(self, x: Array, low: float, high: float) -> Array:
        return self.m.clamp(x, low, high)

    def minimum(self, a: Array, b: Array) -> Array:
        if not isinstance(b, self.m.Tensor):
            return self.m.clamp(a, max=b)
        if not isinstance(a, self.m.Tensor):
            return self.m.clamp(b, max=a)
        return self.m.minimum(a, b)

    def maximum(self, a: Array, b: Array) -> Array:
        if not isinstance(b, self.m.Tensor):
            return self.m.clamp(a, min=b)
        if not isinstance(a, self.m.Tensor):
            return self.m.clamp(b, min=a)
        return self.m.maximum(a, b)

    def sum(self, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        if axis is None:
            return self.m.sum(x)
        return self.m.sum(x, dim=axis, keepdim=keepdims)

    def max(self, x: Array) -> Array:
        return self.m.amax(x)

    def sort(self, x: Array) -> Array:
        return self.m.sort(x).values

    def take(self, x: Array, index: Array) -> Array:
        return x[index.long()]

    def concat(self, xs: list[Array]) -> Array:
        return self.m.cat(xs)


class _TensorFlow(Namespace):
    name = "tensorflow"

    def asarray(self, value: Any, dtype: Any, like: Array | None = None) -> Array:
        return self.m.cast(self.m.convert_to_tensor(value), dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any, like: Array | None = None) -> Array:
        return self.m.zeros(shape, dtype=dtype)

    def arange(self, n: int, like: Array | None = None) -> Array:
        return self.m.range(n, dtype=self.int32)

    def astype(self, x: Array, dtype: Any) -> Array:
        return self.m.cast(x, dtype)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        a, b = self._same_dtype(a, b)
        return self.m.where(cond, a, b)

    def _same_dtype(self, a: Array, b: Array) -> tuple[Array, Array]:
        if self.m.is_tensor(a) and not self.m.is_tensor(b):
            b = self.m.cast(b, a.dtype)
        elif self.m.is_tensor(b) and not self.m.is_tensor(a):
            a = self.m.cast(a, b.dtype)
        return a, b

    def isfinite(self, x: Array) -> Array:
        return self.m.math.is_finite(x)

    def minimum(self, a: Array, b: Array) -> Array:
        a, b = self._same_dtype(a, b)
        return self.m.minimum(a, b)

    def maximum(self, a: Array, b: Array) -> Array:
        a, b = self._same_dtype(a, b)
        return self.m.maximum(a, b)

    def clip(self, x: Array, low: float, high: float) -> Array:
        return self.m.clip_by_value(x, low, high)

    def sum(self, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        return self.m.reduce_sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Array) -> Array:
        return self.m.reduce_max(x)

    def any(self, x: Array) -> Array:
        return self.m.reduce_any(x)

    def concat(self, xs: list[Array]) -> Array:
        return self.m.concat(xs, axis=0)

    def take(self, x: Array, index: Array) -> Array:
        return self.m.gather(x, index)


_BACKENDS: dict[str, tuple[str, type[Namespace]]] = {
    # name: (module that must be imported, namespace class)
    "numpy": ("numpy", _NumPy),
    "host": ("numpy", _Host),
    "torch": ("torch", _Torch),
    "jax": ("jax.numpy", Namespace),
    "tensorflow": ("tensorflow", _TensorFlow),
}
_CACHE: dict[str, Namespace] = {}


def namespace_by_name(name: str) -> Namespace:
    """Returns the namespace of framework ``name`` (it must be imported already).

    Args:
      name: One of ``"numpy"``, ``"host"`` (NumPy with 0-d values as NumPy
        scalars, for decisions taken on the host), ``"torch"``, ``"jax"``,
        ``"tensorflow"``.

    Raises:
      ValueError: for an unknown name or a framework the caller never imported.
    """
    if name in _CACHE:
        return _CACHE[name]
    if name not in _BACKENDS:
        raise ValueError(f"`name` must be one of {sorted(_BACKENDS)}. Received: name={name!r}")
    module_name, cls = _BACKENDS[name]
    if module_name == "numpy":
        import numpy  # numpy is a dependency of safeopt, not a framework

        module: Any = numpy
    else:
        module = sys.modules.get(module_name)
        if module is None:
            raise ValueError(
                f"safeopt never imports a framework: import {name} before using its "
                f"namespace. Received: name={name!r}"
            )
    _CACHE[name] = cls(module)
    return _CACHE[name]


def namespace(*arrays: Array) -> Namespace:
    """Returns the namespace of ``arrays``' framework, found from their types.

    Python scalars are ignored; with no array at all, NumPy is returned.
    """
    for array in arrays:
        root = type(array).__module__.split(".")[0]
        if root in ("builtins",):
            continue
        if root in ("jax", "jaxlib"):
            return namespace_by_name("jax")
        if root in ("tensorflow", "tf_keras"):
            return namespace_by_name("tensorflow")
        if root == "torch":
            return namespace_by_name("torch")
        if root == "numpy":
            return namespace_by_name("numpy")
    return namespace_by_name("numpy")
