"""Keras callbacks at ``model.fit``'s host boundary: telemetry and the divergence guard.

Example:
  >>> import keras, safeopt
  >>> from safeopt_keras.callbacks import SafeoptTelemetry
  >>> opt = safeopt.wrap(keras.optimizers.Adam(1e-3),
  ...                    {"log_every": 50, "log_file": "run.jsonl"})
  >>> # model.compile(optimizer=opt, loss="mse")
  >>> # model.fit(x, y, callbacks=[SafeoptTelemetry()])
"""

from __future__ import annotations

import math
from typing import Any

import keras

import safeopt
import safeopt.adapter as sa
from safeopt_keras._optimizer import SafeOptimizer


class SafeoptTelemetry(keras.callbacks.Callback):
    """Writes a safeopt record every ``log_every`` batches of ``model.fit``.

    The record goes to the sinks of the optimizer's policy (``log_file``,
    ``log_logger``, ``log_tensorboard``) and to those added with
    :func:`safeopt.add_sink`. Each record is one host read of safeopt's
    state, made at the end of a batch, where ``model.fit`` is on the host
    anyway; with ``check`` it also raises :class:`safeopt.DivergenceError`
    once ``max_consecutive_skips`` updates in a row were skipped. Batches in
    between cost an integer test. When the step does not receive the loss,
    the loss Keras shows in ``logs`` (the epoch's running mean) is recorded.

    Args:
      log_every: Overrides the policy's ``log_every`` (which is 0, off, by
        default); ``None`` keeps the policy's.
      check: Raise on divergence at each record.
    """

    def __init__(self, log_every: int | None = None, check: bool = True) -> None:
        super().__init__()
        self.log_every = sa.checked_log_every(log_every)
        self.check = check
        self.step = 0

    def _policy(self, optimizer: Any) -> safeopt.Policy:
        return sa.with_log_every(optimizer.policy, self.log_every)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Counts the batch and records when a ``log_every`` boundary was crossed."""
        optimizer = getattr(self.model, "optimizer", None)
        previous = self.step
        steps_per_execution = getattr(self.model, "steps_per_execution", 1) or 1
        self.step += int(steps_per_execution) if isinstance(steps_per_execution, int) else 1
        if optimizer is None or not hasattr(optimizer, "policy") or not optimizer.built:
            return
        policy = self._policy(optimizer)
        every = policy.log_every
        if every <= 0 or self.step // every == previous // every:
            return
        loss = (logs or {}).get("loss")
        host_loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) \
            else None
        sa.after_step(optimizer, (self.step // every) * every, policy,
                              loss=host_loss, check=self.check)


class DivergenceGuard(keras.callbacks.Callback):
    """Raises :class:`safeopt.DivergenceError` once too many steps in a row were skipped.

    On the TensorFlow and JAX backends the step is compiled and cannot raise
    from inside; this callback reads safeopt's counters at the end of every
    ``every``-th batch (the host boundary ``model.fit`` already has) and calls
    :func:`safeopt.check`, which raises after ``max_consecutive_skips`` skipped
    steps in a row. With ``recover=True`` the step restores the last good
    snapshot instead, and the callback raises once the run diverged with no
    recovery left (``max_recoveries``), naming the recoveries tried. With
    ``steps_per_execution > 1`` Keras calls it once per execution, so it fires
    at the end of the execution that crossed the limit. On the torch backend
    the wrapper raises from the step itself; the callback is harmless there.

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


__all__ = ["DivergenceGuard", "SafeoptTelemetry"]
