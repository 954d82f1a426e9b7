"""The kernel interface: the array operations the pipeline runs over lists of tensors.

:class:`Kernels` is the default implementation, written once over an array
namespace (:mod:`safeopt._xp`): it runs unchanged on NumPy, JAX,
TensorFlow and torch, functionally (every method returns new arrays). An
adapter subclasses it where its framework has faster operations (torch's
foreach kernels work in place and return the same tensors) or where
parameters are sharded (statistics reduced across ranks), so a new
framework works before it is fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from safeopt._xp import Array, Namespace


class Kernels:
    """Operations over lists of gradient (or parameter) tensors.

    Attributes:
      xp: The namespace of the tensors and of the decision.
      unit_axis: The output-unit axis of a weight of rank >= 2 for the
        ``unitwise`` scope: ``-1`` for JAX and Keras kernels ``(..., in,
        out)``, ``0`` for torch weights ``(out, in, ...)``.
    """

    unit_axis = -1

    def __init__(self, xp: Namespace) -> None:
        self.xp = xp

    # -- statistics ------------------------------------------------------------
    def norms(self, tensors: Sequence[Array]) -> Array:
        """float32 1-d: the L2 norm of each tensor, accumulated in float32."""
        xp = self.xp
        if not tensors:
            return xp.zeros((0,), xp.float32)
        return xp.stack([self.norm(t) for t in tensors])

    def grad_norms(self, grads: Sequence[Array]) -> Array:
        """float32 1-d: the L2 norm of each gradient (an adapter may unscale them here)."""
        return self.norms(grads)

    def norm(self, tensor: Array) -> Array:
        """float32 0-d: the L2 norm of one tensor."""
        xp = self.xp
        t32 = xp.astype(tensor, xp.float32)
        return xp.sqrt(xp.sum(t32 * t32))

    def global_norm(self, tensors: Sequence[Array]) -> Array:
        """float32 0-d: the L2 norm of all ``tensors`` together."""
        norms = self.norms(tensors)
        return self.xp.sqrt(self.xp.sum(norms * norms))

    def max_abs(self, tensors: Sequence[Array]) -> Array:
        """float32 0-d: the largest ``|x|`` over every element (0 when there is none)."""
        xp = self.xp
        maxes = [xp.astype(xp.max(xp.abs(t)), xp.float32) for t in tensors
                 if math.prod(t.shape) > 0]
        return xp.max(xp.stack(maxes)) if maxes else xp.full_like(None, 0.0, xp.float32)

    def unit_norms(self, tensor: Array) -> Array:
        """The L2 norm of each output unit (keepdims; a tensor of rank <= 1 is one unit)."""
        xp = self.xp
        t32 = xp.astype(tensor, xp.float32)
        sq = t32 * t32
        rank = xp.ndim(tensor)
        if rank <= 1:
            return xp.sqrt(xp.sum(sq))
        axis = self.unit_axis % rank
        return xp.sqrt(xp.sum(sq, axis=tuple(a for a in range(rank) if a != axis),
                              keepdims=True))

    def expand(self, values: Array, positions: Sequence[int] | None,
               n: int) -> tuple[Array, Array | None]:
        """Per-tensor ``values`` of the tensors present, spread over all ``n`` tensors.

        Returns ``(full, present)``: ``full[positions[j]] = values[j]`` (0
        elsewhere) and a bool mask of the present tensors, or ``(values,
        None)`` when every tensor is present.
        """
        if positions is None or len(positions) == n:
            return values, None
        xp = self.xp
        zero = xp.full_like(values, 0.0, xp.float32)
        where = {p: j for j, p in enumerate(positions)}
        full = xp.stack([values[where[i]] if i in where else zero for i in range(n)])
        present = xp.asarray([i in where for i in range(n)], xp.bool, like=values)
        return full, present

    # -- changes to the gradients ---------------------------------------------------
    def add_penalty(self, grads: list[Array], params: Sequence[Array], l1: Any,
                    l2: Any) -> list[Array]:
        """Adds ``l1 * sign(w) + 2 * l2 * w`` to each gradient (Python floats or 0-d arrays)."""
        xp = self.xp
        out = []
        for g, w in zip(grads, params):
            if _nonzero(l1):
                g = g + _as(xp, l1, g) * xp.sign(w)
            if _nonzero(l2):
                g = g + 2.0 * _as(xp, l2, g) * w
            out.append(g)
        return out

    def clamp(self, grads: list[Array], bound: float) -> list[Array]:
        """Every element clamped to ``[-bound, bound]``."""
        return [self.xp.clip(g, -bound, bound) for g in grads]

    def scale(self, grads: list[Array], scale: Array) -> list[Array]:
        """Every gradient multiplied by the 0-d ``scale``."""
        return [g * self.xp.astype(scale, g.dtype) for g in grads]

    def scale_each(self, grads: list[Array], scales: Array) -> list[Array]:
        """Gradient ``i`` multiplied by ``scales[i]`` (1-d)."""
        return [g * self.xp.astype(scales[i], g.dtype) for i, g in enumerate(grads)]

    def scale_units(self, grads: list[Array], scales: Sequence[Array]) -> list[Array]:
        """Gradient ``i`` multiplied by ``scales[i]`` (broadcast per unit)."""
        return [g * self.xp.astype(s, g.dtype) for g, s in zip(grads, scales)]

    # -- control ------------------------------------------------------------------
    def when(self, pred: Any, compute: Callable[[], Array], otherwise: float) -> Array:
        """``compute()`` if ``pred`` else a 0-d float32 ``otherwise``.

        ``pred`` is a Python bool (then only one branch runs) or a 0-d bool
        array; the default evaluates both branches and selects, adapters
        with a device conditional (``lax.cond``, ``ops.cond``) override it.
        """
        if isinstance(pred, bool):
            return compute() if pred else self.xp.full_like(None, otherwise, self.xp.float32)
        return self.xp.where(pred, compute(), otherwise)


def _nonzero(c: Any) -> bool:
    return not (isinstance(c, float) and c == 0.0)


def _as(xp: Namespace, c: Any, like: Array) -> Any:
    return c if isinstance(c, float) else xp.astype(c, like.dtype)
