"""safeopt in Hugging Face ``transformers.Trainer``.

Import this module only when you use transformers (it imports it). Plug
safeopt in one of two ways, and add :class:`SafeoptCallback`:

* ``Trainer(..., optimizers=(safeopt.wrap(torch.optim.AdamW(...), policy), None))``:
  you build the optimizer (and its parameter groups) yourself;
* ``Trainer(..., optimizer_cls_and_kwargs=(optimizer_class(torch.optim.AdamW,
  policy), {"lr": 1e-3}))``: Trainer builds it from its own parameter groups
  (weight decay off for biases and norms, as ``TrainingArguments.weight_decay``
  says).

Trainer calls ``optimizer.step()`` without the loss, steps its LR scheduler
after every step (even one safeopt skipped), and clips the gradients itself
before the step when ``TrainingArguments.max_grad_norm > 0`` (the default is
1.0). :class:`SafeoptCallback` closes those gaps; see its docstring.
``safeopt.stats(trainer.optimizer)`` reads through accelerate's
``AcceleratedOptimizer``.

Example:
  >>> import safeopt, torch
  >>> from safeopt_torch.hf import SafeoptCallback, optimizer_class
  >>> # trainer = transformers.Trainer(
  >>> #     model=model, train_dataset=data, callbacks=[SafeoptCallback()],
  >>> #     args=transformers.TrainingArguments(..., max_grad_norm=0.0),
  >>> #     optimizer_cls_and_kwargs=(optimizer_class(torch.optim.AdamW, {"clip_norm": 1.0}),
  >>> #                               {"lr": 1e-3}))
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

import safeopt
import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch import _trainers
from safeopt_torch._optimizer import SafeOptimizer

#: The counters :class:`SafeoptCallback` adds to Trainer's training logs (prefixed ``safeopt/``).
LOGGED = ("skips", "nonfinite", "spikes", "norm_clips", "value_clips", "clip_rate", "skip_rate")


def optimizer_class(inner: type[torch.optim.Optimizer],
                    policy: sa.PolicyLike = None) -> type[SafeOptimizer]:
    """A :class:`SafeOptimizer` class building ``inner``, for ``optimizer_cls_and_kwargs``.

    Trainer calls ``cls(param_groups, **kwargs)``; the class builds
    ``inner(param_groups, **kwargs)`` and wraps it with ``policy``, validated
    here, before training starts.

    Args:
      inner: A ``torch.optim.Optimizer`` class, e.g. ``torch.optim.AdamW``.
      policy: Anything :func:`safeopt.load_policy` accepts.

    Returns:
      A subclass of :class:`SafeOptimizer` (so that Trainer takes it for an
      optimizer class, not for a factory of its own kind).
    """
    if not (isinstance(inner, type) and issubclass(inner, torch.optim.Optimizer)):
        raise TypeError("`inner` must be a torch.optim.Optimizer class. "
                        f"Received: inner={inner!r}")
    resolved = safeopt.load_policy(policy)

    def init(self: SafeOptimizer, params: Any, **kwargs: Any) -> None:
        SafeOptimizer.__init__(self, inner(params, **kwargs), resolved)

    return type(f"Safe{inner.__name__}", (SafeOptimizer,), {
        "__init__": init, "__module__": __name__,
        "__doc__": f"``{inner.__name__}`` wrapped by safeopt with {resolved!r}."})


class SafeoptCallback(TrainerCallback):
    """Makes ``transformers.Trainer`` hand safeopt what it needs, and report what it did.

    * **Double clipping is refused** (when Trainer is built, or at the start of
      training when Trainer builds the optimizer): with
      ``TrainingArguments.max_grad_norm > 0`` Trainer clips before
      ``optimizer.step()``, ahead of safeopt's non-finite check, and safeopt
      would count no clips. The error names the remedies:
      ``TrainingArguments(max_grad_norm=0.0)``, or a policy that does not clip.
      A callback on a Trainer whose optimizer safeopt did not wrap is refused
      too.
    * **The loss reaches the policy**: a forward hook on the model keeps the
      ``loss`` of its outputs in training mode, and before each optimizer step
      the step's loss (the sum of the micro-batch losses when Trainer
      normalises them over the accumulated batch with ``num_items_in_batch``,
      else their mean: the loss Trainer logs) goes to
      :meth:`SafeOptimizer.set_loss`. A model whose outputs carry no ``loss``
      (a ``compute_loss_func``, label smoothing) gets a warning, or an error
      with ``spike_skip="loss"``.
    * **The LR scheduler does not advance on a skipped step** (with
      ``skip_aware_scheduler``): after a skipped step, Trainer's next call to
      ``lr_scheduler.step()`` does nothing. Knowing whether the step was
      skipped is free on CPU, and one read of the device per step elsewhere
      (none with a policy that never skips).
    * **Skips and clips are logged**: every training log (the ones with
      ``loss``) gets safeopt's counters, ``safeopt/skips``,
      ``safeopt/norm_clips``... (see :data:`LOGGED`), in ``logs`` and in
      ``trainer.state.log_history``; one host read per log. Trainer runs the
      reporting integrations (TensorBoard, W&B...) before the callbacks
      passed in ``callbacks=``: :func:`add_callback` puts the callback first,
      so that they report the counters too.

    Args:
      skip_aware_scheduler: Keep the LR scheduler in place on skipped steps.
    """

    def __init__(self, skip_aware_scheduler: bool = True) -> None:
        self.skip_aware_scheduler = skip_aware_scheduler
        self._optimizer: SafeOptimizer | None = None
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []
        self._normalised = False
        self._warned = False
        self._scheduler: Any = None

    # -- checks ---------------------------------------------------------------------
    def check(self, args: Any, optimizer: Any) -> SafeOptimizer:
        """Refuses an optimizer safeopt did not wrap, and Trainer's clipping on top of safeopt's."""
        safe = _trainers.find(optimizer)
        if safe is None:
            raise ValueError(
                "SafeoptCallback needs a Trainer optimizer made by safeopt.wrap. Received: "
                f"{type(optimizer).__name__}. Pass `optimizers=(safeopt.wrap(torch.optim."
                "AdamW(...), policy), None)` or `optimizer_cls_and_kwargs=(safeopt_torch.hf."
                "optimizer_class(torch.optim.AdamW, policy), {...})` to the Trainer.")
        clips = _trainers.clipping(safe.policy)
        max_norm = getattr(args, "max_grad_norm", None)
        if max_norm and max_norm > 0 and clips:
            off = {key: None for key in clips}
            raise ValueError(
                "`max_grad_norm` must be 0 when safeopt's policy clips: Trainer clips the "
                "gradients before `optimizer.step()`, so they would be clipped twice (first "
                "ahead of safeopt's non-finite check) and safeopt would count no clips. "
                f"Received: max_grad_norm={max_norm} with the policy's {clips}. Set "
                "`TrainingArguments(max_grad_norm=0.0)` and let safeopt clip, or let Trainer "
                f"clip alone with a policy that does not: {off}.")
        return safe

    # -- Trainer events -------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                    **kwargs: Any) -> None:
        """Checks the optimizer given to Trainer, if any, before anything runs."""
        if optimizer is not None:
            self.check(args, optimizer)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Checks the optimizer Trainer trains with, and hooks the model's forward."""
        self._optimizer = self.check(args, optimizer)
        self._losses.clear()
        self._remove_hook()
        if model is not None:
            self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any,
                              **kwargs: Any) -> None:
        """Hands the step's loss to the optimizer."""
        safe = self._optimizer
        if safe is None:
            return
        losses, self._losses = self._losses, []
        if not losses:
            self._missing_loss(safe.policy)
            return
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        safe.set_loss(total if self._normalised else total / len(losses))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None,
                          **kwargs: Any) -> None:
        """After a skipped step, makes the scheduler's next ``step()`` a no-op."""
        safe = self._optimizer
        if (self.skip_aware_scheduler and safe is not None and lr_scheduler is not None
                and _can_skip(safe.policy) and safe.last_step_skipped):
            lr_scheduler.step = _Unchanged(lr_scheduler)
            self._scheduler = lr_scheduler

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Puts the scheduler's own ``step`` back (before a checkpoint can save it)."""
        if self._scheduler is not None:
            _restore(self._scheduler)
            self._scheduler = None

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               optimizer: Any = None, **kwargs: Any) -> None:
        """Adds safeopt's counters to a training log and to its entry in the log history."""
        if not isinstance(logs, dict) or "loss" not in logs:
            return
        safe = self._optimizer or _trainers.find(optimizer)
        if safe is None:
            return
        stats = safeopt.stats(safe)
        values = {f"safeopt/{key}": stats[key] for key in LOGGED}
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("loss") == logs["loss"]:
            history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Removes the forward hook."""
        self._remove_hook()
        self._optimizer = None

    # -- the loss ---------------------------------------------------------------------------
    def _keep_loss(self, module: torch.nn.Module, args: Any, kwargs: Mapping[str, Any],
                   output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float().mean())
            self._normalised = kwargs.get("num_items_in_batch") is not None

    def _missing_loss(self, policy: Policy) -> None:
        message = ("SafeoptCallback saw no loss in the model's outputs during this step (a "
                   "`compute_loss_func`, label smoothing, or a model that returns no `loss`), "
                   "so the policy gets none")
        if policy.spike_skip == "loss":
            raise ValueError(f"{message}, and `spike_skip='loss'` needs it. Received: outputs "
                             "without `loss`. Have the model return its loss (pass `labels`), "
                             "or use spike_skip='grad_norm'.")
        if not self._warned:
            self._warned = True
            warnings.warn(f"{message}: the diagnosis's loss signs stay silent and "
                          "`stats()['last_loss']` stays None.", RuntimeWarning, stacklevel=2)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _can_skip(policy: Policy) -> bool:
    """Whether the policy can skip a step at all (else nothing is read from the device)."""
    return policy.skip_nonfinite or policy.spike_skip is not None


class _Unchanged:
    """A scheduler's ``step`` for once: does nothing, then gives the scheduler its own back."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        _restore(self.scheduler)


def _restore(scheduler: Any) -> None:
    if isinstance(vars(scheduler).get("step"), _Unchanged):
        del scheduler.step


def add_callback(trainer: Any, callback: SafeoptCallback | None = None) -> SafeoptCallback:
    """Adds ``callback`` (a new :class:`SafeoptCallback` if ``None``) first in line.

    First, so that the reporting integrations Trainer runs before the callbacks
    given in ``callbacks=`` (TensorBoard, W&B...) see safeopt's counters in
    the logs. Checks Trainer's optimizer now, if it has one.

    Returns:
      The callback.
    """
    callback = callback if callback is not None else SafeoptCallback()
    if trainer.optimizer is not None:
        callback.check(trainer.args, trainer.optimizer)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


__all__ = ["LOGGED", "SafeoptCallback", "add_callback", "optimizer_class"]
