"""Norm clipping and its scopes: global, per tensor, unitwise (AGC).

The ``global`` scope is decided with the rest of the step (its threshold
may be adaptive, see :mod:`safeopt._features.adaptive`) and applied after
the decision; the local scopes clip each tensor (or unit) on its own while
the statistics are gathered. A new scope is one function in :data:`LOCAL`
(plus its name in the policy's ``norm_scope`` choices and its rows in the
conformance table): it receives the adapter's kernels, so it runs with each
framework's fast operations and needs nothing from the adapters.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063 (norm clipping).
  Brock, De, Smith & Simonyan (2021), High-Performance Large-Scale Image
  Recognition Without Normalization. https://arxiv.org/abs/2102.06171 (AGC).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from safeopt._xp import Array, Namespace

if TYPE_CHECKING:
    from safeopt._kernels import Kernels
    from safeopt._policy import Policy

_FLOAT32_MAX = 3.4028234663852886e38


def clip_scale(xp: Namespace, norm: Array, threshold: Array | float) -> Array:
    """Norm-clip multiplier: ``threshold / norm`` where ``norm > threshold``, else 1.

    A non-finite norm gives 1 (the non-finite check decides about it), an
    infinite threshold gives 1, and the result is always in (0, 1].
    """
    over = xp.logical_and(norm > threshold, xp.isfinite(norm))
    return xp.where(over, threshold / xp.where(over, norm, 1.0), 1.0)


def global_clip(xp: Namespace, norm: Array, threshold: Array) -> tuple[Array, Array]:
    """``(scale, clipped)`` of the global scope: ``clip_scale`` and whether it is < 1."""
    clipped = xp.logical_and(norm > threshold, xp.isfinite(norm))
    return clip_scale(xp, norm, threshold), clipped


def inverse_scale(xp: Namespace, norm: Array, threshold: Array, clipped: Array) -> Array:
    """``1 / scale`` computed directly (``norm / threshold``, or exactly 1).

    What a kernel that divides by a ``grad_scale`` wants (torch's fused
    optimizers), without the rounding of a reciprocal.
    """
    return xp.where(clipped, xp.minimum(norm / threshold, _FLOAT32_MAX), 1.0)


def unit_scale(xp: Namespace, grad_norm: Array, weight_norm: Array, clipping: float,
               eps: float) -> Array:
    """AGC multiplier per unit, as ``optax.adaptive_grad_clip`` computes it.

    A unit's gradient is rescaled to ``clipping * max(||w||, eps)`` when its
    norm is at least that (Brock et al., 2021).
    """
    max_norm = xp.maximum(weight_norm, eps) * clipping
    keep = grad_norm < max_norm
    return xp.where(keep, 1.0, max_norm / xp.maximum(grad_norm, 1e-6))


def per_tensor(k: Kernels, policy: Policy, grads: list[Array], params: Sequence[Array] | None,
               norms: Array) -> tuple[list[Array], Array]:
    """Each tensor against ``clip_norm`` on its own (Keras ``clipnorm``)."""
    assert policy.clip_norm is not None
    scales = clip_scale(k.xp, norms, policy.clip_norm)
    return k.scale_each(grads, scales), k.xp.any(scales < 1.0)


def unitwise(k: Kernels, policy: Policy, grads: list[Array], params: Sequence[Array] | None,
             norms: Array) -> tuple[list[Array], Array]:
    """Each output unit against ``clip_norm`` times its weight norm (AGC)."""
    assert params is not None and policy.clip_norm is not None
    xp = k.xp
    scales = [unit_scale(xp, k.unit_norms(g), k.unit_norms(w), policy.clip_norm,
                         policy.unitwise_eps) for g, w in zip(grads, params)]
    clipped = xp.any(xp.stack([xp.any(s < 1.0) for s in scales]))
    return k.scale_units(grads, scales), clipped


LocalScope = Callable[["Kernels", "Policy", list[Array], "Sequence[Array] | None", Array],
                      tuple[list[Array], Array]]

#: The scopes that clip while the statistics are gathered (everything but ``global``).
LOCAL: dict[str, LocalScope] = {"per_tensor": per_tensor, "unitwise": unitwise}


def clip_local(k: Kernels, policy: Policy, grads: list[Array], params: Sequence[Array] | None,
               norms: Array) -> tuple[list[Array], Array | None]:
    """Applies a local scope; ``(grads, None)`` for ``global`` or no norm clipping."""
    if policy.clip_norm is None or policy.norm_scope == "global" or not grads:
        return grads, None
    return LOCAL[policy.norm_scope](k, policy, grads, params, norms)
