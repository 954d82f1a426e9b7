"""The loss of the coming step, taken where Keras 3's trainers hand it to the optimizer.

``model.fit`` never passes the loss to ``apply``: each backend's
``train_step`` computes the loss, hands it to ``optimizer.scale_loss`` (that
is how ``LossScaleOptimizer`` scales it), takes the gradients and calls
``apply`` (``stateless_apply`` on JAX) in the same traced function. The
wrapper's ``scale_loss`` keeps the loss here, per optimizer and per thread
(``tf.distribute`` traces each replica in a thread of its own), and the step
that follows takes it.

On JAX ``scale_loss`` runs inside ``jax.value_and_grad``, where the loss is a
tracer of the differentiation, unusable once it returns. The loss goes
through an identity with a custom JVP rule: JAX calls the rule with the
primal value, a tracer of the enclosing ``jit`` (or a concrete array when
eager), and that is the value kept.
"""

from __future__ import annotations

import threading
from typing import Any

import keras

_LOCAL = threading.local()
_JAX_IDENTITY: Any = None


def _pending() -> dict[int, Any]:
    pending = getattr(_LOCAL, "pending", None)
    if pending is None:
        pending = _LOCAL.pending = {}
    return pending


def put(owner: object, loss: Any) -> Any:
    """Keeps ``loss`` for ``owner``'s next step; returns the loss to continue with."""
    pending = _pending()
    if hasattr(loss, "detach"):  # torch: no graph kept alive
        pending[id(owner)] = loss.detach()
        return loss
    pending[id(owner)] = loss
    if keras.backend.backend() != "jax":
        return loss
    _LOCAL.receiver = id(owner)
    try:
        return _jax_identity()(loss)
    finally:
        _LOCAL.receiver = None


def take(owner: object) -> Any:
    """The loss kept for ``owner`` (``None`` if none), forgotten once taken."""
    return _pending().pop(id(owner), None)


def _jax_identity() -> Any:
    """``lambda x: x``, whose JVP rule keeps the primal (built on first use)."""
    global _JAX_IDENTITY
    if _JAX_IDENTITY is None:
        import jax

        @jax.custom_jvp
        def identity(x: Any) -> Any:
            return x

        @identity.defjvp
        def identity_jvp(primals: Any, tangents: Any) -> Any:
            receiver = getattr(_LOCAL, "receiver", None)
            if receiver is not None:
                _pending()[receiver] = primals[0]
            return primals[0], tangents[0]

        _JAX_IDENTITY = identity
    return _JAX_IDENTITY
