"""safeopt for Keras 3 (TensorFlow, JAX and torch backends).

``safeopt.wrap(keras_optimizer, policy)`` returns a :class:`SafeOptimizer`,
itself a ``keras.optimizers.Optimizer``: use it in ``model.compile``, in
custom loops with ``apply_gradients``, and through ``stateless_apply`` on JAX.
Add :class:`DivergenceGuard` to ``model.fit``'s callbacks so that a run that
keeps producing NaN stops with :class:`safeopt.DivergenceError` (on torch the
step raises by itself), and :class:`SafeoptTelemetry` to record every
``log_every`` steps.

Example:
  >>> import keras, safeopt
  >>> opt = safeopt.wrap(keras.optimizers.Adam(1e-3), {"clip_norm": 1.0})
  >>> type(opt).__name__
  'SafeOptimizer'
"""

from safeopt_keras._adapter import KerasAdapter
from safeopt_keras._optimizer import SafeOptimizer
from safeopt_keras.callbacks import DivergenceGuard, SafeoptTelemetry

__all__ = ["DivergenceGuard", "KerasAdapter", "SafeOptimizer", "SafeoptTelemetry"]
