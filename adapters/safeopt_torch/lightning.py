"""PyTorch Lightning callback: safeopt telemetry after each training batch.

Lightning is optional: without it the callback is a plain object with
Lightning's hook signature (``on_train_batch_end(trainer, pl_module,
outputs, batch, batch_idx)``), which Lightning's ``Trainer`` would call the
same way; with ``lightning`` (or ``pytorch_lightning``) installed it
subclasses their ``Callback``.

Example:
  >>> from safeopt_torch.lightning import SafeoptLightningCallback
  >>> # trainer = lightning.Trainer(callbacks=[SafeoptLightningCallback()])
  >>> # in configure_optimizers: return safeopt.wrap(torch.optim.AdamW(...),
  >>> #                                 {"log_every": 50, "log_file": "run.jsonl"})
"""

from __future__ import annotations

import math
from typing import Any

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch._optimizer import SafeOptimizer

try:  # pragma: no cover - depends on the environment
    from lightning.pytorch import Callback as _Base
except ImportError:  # pragma: no cover
    try:
        from pytorch_lightning import Callback as _Base
    except ImportError:
        _Base = object


class SafeoptLightningCallback(_Base):
    """Writes a safeopt record every ``log_every`` optimizer steps of a Lightning run.

    For every safeopt-wrapped optimizer of the trainer, at the end of each
    training batch: nothing unless ``trainer.global_step`` is a multiple of
    the policy's ``log_every``; then one host read, one record to the
    policy's sinks and :func:`safeopt.add_sink`'s, and (with ``check``) the
    divergence guard. The loss of ``outputs`` is recorded when the step did
    not receive it.

    Args:
      log_every: Overrides the policy's ``log_every``; ``None`` keeps it.
      check: Raise :class:`safeopt.DivergenceError` on divergence.
    """

    def __init__(self, log_every: int | None = None, check: bool = True) -> None:
        super().__init__()
        self.log_every = sa.checked_log_every(log_every)
        self.check = check

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Records for each wrapped optimizer when the global step is due."""
        step = int(trainer.global_step)
        for optimizer in _safe_optimizers(trainer):
            policy = self._policy(optimizer.policy)
            if not sa.telemetry_due(policy, step):
                continue
            sa.after_step(optimizer, step, policy, loss=_host_loss(outputs),
                                  check=self.check)

    def _policy(self, policy: Policy) -> Policy:
        return sa.with_log_every(policy, self.log_every)


def _safe_optimizers(trainer: Any) -> list[SafeOptimizer]:
    found = []
    for optimizer in getattr(trainer, "optimizers", None) or []:
        inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps it
        for candidate in (optimizer, inner, getattr(optimizer, "_optimizer", None)):
            if isinstance(candidate, SafeOptimizer):
                found.append(candidate)
                break
    return found


def _host_loss(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is None:
        return None
    try:
        value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    except (TypeError, ValueError, RuntimeError):
        return None
    return value if math.isfinite(value) else None


__all__ = ["SafeoptLightningCallback"]
