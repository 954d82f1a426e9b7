"""Keras callbacks: the divergence guard at ``model.fit``'s host boundary."""

from __future__ import annotations

from typing import Any

import keras

import safeopt
from safeopt_keras._optimizer import SafeOptimizer


class DivergenceGuard(keras.callbacks.Callback):
    """Raises :class:`safeopt.DivergenceError` once too many steps in a row were skipped.

    On the TensorFlow and JAX backends the step is compiled and cannot raise
    from inside; this callback reads safeopt's counters at the end of every
    ``every``-th batch (the host boundary ``model.fit`` already has) and calls
    :func:`safeopt.check`, which raises after ``max_consecutive_skips`` skipped
    steps in a row. With ``steps_per_execution > 1`` Keras calls it once per
    execution, so it fires at the end of the execution that crossed the limit.
    On the torch backend the wrapper raises from the step itself; the callback
    is harmless there.

    Args:
      every: Check every this many batches (each check is one host read of a
        few scalars).

    Example:
      >>> import keras, safeopt, safeopt_keras
      >>> guard = safeopt_keras.DivergenceGuard()
      >>> # model.fit(x, y, callbacks=[guard])
    """

    def __init__(self, every: int = 1) -> None:
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an integer >= 1. Received: every={every!r}")
        self.every = every
        self._batches = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        """Checks the counters every ``every`` batches."""
        self._batches += 1
        if self._batches % self.every == 0:
            self._check()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """Checks at the end of each epoch too."""
        self._check()

    def _check(self) -> None:
        optimizer = getattr(self.model, "optimizer", None)
        if isinstance(optimizer, SafeOptimizer) and optimizer.built:
            safeopt.check(optimizer)
