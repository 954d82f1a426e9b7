"""A small array namespace over NumPy, torch, JAX and TensorFlow.

safeopt's policy math is written once against the handful of operations
below (the Array API spelling: ``where``, ``sqrt``, ``isfinite``, ...), and
runs unchanged, and without host synchronisation, on each framework's own
arrays. Like einops' ``_backends``, a namespace is looked up from the
arrays' types and a framework is never imported here: it is read from
``sys.modules`` once the caller has imported it.
"""

from __future__ import annotations

import sys
from typing import Any

from safeopt._xp_base import Array, Namespace, _NumPy
from safeopt._xp_host import _Host

__all__ = ["Array", "Namespace", "namespace", "namespace_by_name"]


class _Torch(Namespace):
    name = "torch"

    def asarray(self, value: Any, dtype: Any, like: Array | None = None) -> Array:
        device = None if like is None else like.device
        return self.m.as_tensor(value, dtype=dtype, device=device)

    def zeros(self, shape: tuple[int, ...], dtype: Any, like: Array | None = None) -> Array:
        device = None if like is None else like.device
        return self.m.zeros(shape, dtype=dtype, device=device)

    def full_like(self, like: Array | None, value: float, dtype: Any) -> Array:
        device = None if like is None else like.device
        return self.m.full((), value, dtype=dtype, device=device)

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

    def concat(self, xs: list[Array]) -> Array:
        return self.m.cat(xs)


class _TensorFlow(Namespace):
    name = "tensorflow"

    def asarray(self, value: Any, dtype: Any, like: Array | None = None) -> Array:
        return self.m.cast(self.m.convert_to_tensor(value), dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any, like: Array | None = None) -> Array:
        return self.m.zeros(shape, dtype=dtype)

    def full_like(self, like: Array | None, value: float, dtype: Any) -> Array:
        return self.m.constant(value, dtype=dtype)

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
