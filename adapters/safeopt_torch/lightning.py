"""PyTorch Lightning: safeopt's clipping guard, and telemetry after each training batch.

Return ``safeopt.wrap(torch.optim.AdamW(...), policy)`` from
``configure_optimizers``. Lightning's ``optimizer.step(closure)`` reaches
:class:`~safeopt_torch.SafeOptimizer` with its training closure, whose return
value, the loss, goes to the policy (with ``accumulate_grad_batches=k`` it is
the last micro-batch's loss divided by ``k``, as Lightning's closure returns
it). ``safeopt.stats(trainer.optimizers[0])`` reads it.

Lightning clips the gradients inside that closure when the Trainer has a
``gradient_clip_val``: before safeopt's non-finite check, and so that safeopt
would count no clips. safeopt registers a guard under Lightning's entry-point
groups for external callbacks (``lightning.pytorch.callbacks_factory`` and
``pytorch_lightning.callbacks_factory``), so every Trainer gets it without a
line of yours: at ``fit`` it refuses ``gradient_clip_val`` together with a
policy that clips, naming the policy keys to use instead.
:class:`SafeoptLightningCallback` checks the same.

Lightning is optional: without it :class:`SafeoptLightningCallback` is a
plain object with Lightning's hook signature; with ``lightning`` (or
``pytorch_lightning``) installed it subclasses their ``Callback``, the one of
the package already imported when both are installed.

Example:
  >>> from safeopt_torch.lightning import SafeoptLightningCallback
  >>> # trainer = lightning.Trainer(callbacks=[SafeoptLightningCallback()])
  >>> # in configure_optimizers: return safeopt.wrap(torch.optim.AdamW(...),
  >>> #                                 {"log_every": 50, "log_file": "run.jsonl"})
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
from typing import Any

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch import _trainers
from safeopt_torch._optimizer import SafeOptimizer

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def _callback_base() -> type:
    """Lightning's ``Callback``: of the package imported already, else of the one installed."""
    ordered = sorted(_PACKAGES, key=lambda name: name.split(".")[0] not in sys.modules)
    for name in ordered:
        try:
            return importlib.import_module(name).Callback
        except ImportError:
            continue
    return object


def refuse_double_clipping(trainer: Any) -> None:
    """Refuses a Trainer ``gradient_clip_val`` together with a safeopt policy that clips.

    Raises:
      ValueError: with the policy keys that clip as Lightning would.
    """
    clip = getattr(trainer, "gradient_clip_val", None)
    if not clip:
        return
    algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
    algorithm = str(getattr(algorithm, "value", algorithm))  # Lightning's enum, or a string
    remedy = {"clip_value": clip} if algorithm == "value" else \
        {"clip_norm": clip, "norm_scope": "global"}
    for optimizer in _safe_optimizers(trainer):
        clips = _trainers.clipping(optimizer.policy)
        if clips:
            raise ValueError(
                "`gradient_clip_val` must not be set when safeopt's policy clips: Lightning "
                "clips the gradients inside the training closure, before safeopt's non-finite "
                "check, so they would be clipped twice and safeopt would count no clips. "
                f"Received: gradient_clip_val={clip}, gradient_clip_algorithm={algorithm!r} "
                f"with the policy's {clips}. Remove `gradient_clip_val` from the Trainer and "
                f"clip in the policy instead: {remedy}.")


class _Guard:
    """Lightning's hook that checks a Trainer at ``fit`` (mixed into a ``Callback``)."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Refuses double clipping (see :func:`refuse_double_clipping`)."""
        refuse_double_clipping(trainer)


@functools.cache
def _guard_class(base: type) -> type:
    return type("SafeoptClippingGuard", (_Guard, base), {
        "__module__": __name__,
        "__doc__": "safeopt's guard against double clipping, added to every Lightning Trainer."})


def lightning_callbacks() -> list[Any]:
    """Entry point of ``lightning.pytorch.callbacks_factory``: the clipping guard."""
    from lightning.pytorch import Callback

    return [_guard_class(Callback)()]


def pytorch_lightning_callbacks() -> list[Any]:
    """Entry point of ``pytorch_lightning.callbacks_factory``: the clipping guard."""
    from pytorch_lightning import Callback

    return [_guard_class(Callback)()]


class SafeoptLightningCallback(_Guard, _callback_base()):  # type: ignore[misc]
    """Writes a safeopt record every ``log_every`` optimizer steps of a Lightning run.

    For every safeopt-wrapped optimizer of the trainer, at the end of each
    training batch: nothing unless ``trainer.global_step`` is a multiple of
    the policy's ``log_every``; then one host read, one record to the
    policy's sinks and :func:`safeopt.add_sink`'s, and (with ``check``) the
    divergence guard. The loss of ``outputs`` is recorded when the step did
    not receive it. At ``fit`` it refuses double clipping, as the guard does.

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
    found = (_trainers.find(opt) for opt in getattr(trainer, "optimizers", None) or [])
    return [opt for opt in found if opt is not None]


def _host_loss(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is None:
        return None
    try:
        value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    except (TypeError, ValueError, RuntimeError):
        return None
    return value if math.isfinite(value) else None


__all__ = ["SafeoptLightningCallback", "lightning_callbacks", "pytorch_lightning_callbacks",
           "refuse_double_clipping"]
