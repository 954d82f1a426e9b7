"""Closures under a policy: ``opt.step(closure)`` on a :class:`~safeopt_torch.SafeOptimizer`.

The wrapper evaluates the closure once itself and takes the step's decision
on those gradients (skip, clip, penalty, counters), exactly as for a step
without a closure. The inner optimizer is then handed a :class:`Replay`
of the closure: its first call returns that evaluation's loss (the
gradients, with the policy applied, are already in ``.grad``), so an
optimizer that evaluates its closure once (every ``torch.optim`` optimizer
but ``LBFGS``) sees exactly what a bare one would, with no extra
evaluation. Every later call (``LBFGS``'s iterations and line search)
evaluates the closure and applies the policy to the gradients it produced
(:func:`reapply`) with the thresholds in force for this step; safeopt's
state advances once per step, not per evaluation. Norm clipping at every
evaluation changes the gradients ``LBFGS`` builds its curvature estimates
from, as a ``clip_grad_norm_`` inside the closure would (and a penalty
adds to the gradients, not to the loss the line search compares): a policy
that only skips non-finite updates leaves ``LBFGS``'s model of the
objective intact.

When the policy skips non-finite updates and a later evaluation is
non-finite (loss or gradients), the replay raises :class:`Abort`: the
wrapper puts the parameters and the inner optimizer's state back as they
were before the inner step (:func:`safeopt_torch._delegate.snapshot`) and
counts the step as a skip (:func:`abandon`), so it never happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import safeopt.adapter as sa
from safeopt_torch import _batch
from safeopt_torch._kernels import TorchKernels
from safeopt_torch._paths import host_value
from safeopt_torch._runner import Runner


class Abort(Exception):  # noqa: N818 - an internal signal, not an error
    """A re-evaluation was non-finite: the inner step is abandoned (never escapes the wrapper).

    Attributes:
      stats: That evaluation's statistics, in the runner's namespace.
    """

    def __init__(self, stats: sa.GradStats) -> None:
        super().__init__("a closure re-evaluation was non-finite")
        self.stats = stats


class Replay:
    """The closure handed to the inner optimizer (see the module docstring).

    Args:
      closure: The user's closure.
      loss: What its first evaluation (made by the wrapper) returned.
      run: The wrapper's runner (policy, device, where decisions are taken).
      state: safeopt's state before this step (its thresholds are in force).
      may_abort: Raise :class:`Abort` on a non-finite re-evaluation (the
        policy skips non-finite updates and the wrapper holds a snapshot).
    """

    def __init__(self, closure: Callable[[], Any], loss: Any, run: Runner, state: sa.State,
                 may_abort: bool) -> None:
        self.closure = closure
        self.loss = loss
        self.run = run
        self.state = state
        self.may_abort = may_abort
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls == 1:
            return self.loss
        with torch.enable_grad():
            loss = self.closure()
        with torch.no_grad():
            stats, finite = reapply(self.run, self.state, loss, check=self.may_abort)
        if not finite and stats is not None:
            raise Abort(stats)
        return loss


def reapply(run: Runner, state: sa.State, loss: Any,
            check: bool) -> tuple[sa.GradStats | None, bool]:
    """Applies the policy to the current gradients without changing safeopt's state.

    The penalty, the value clip and the local scopes are applied as in
    :func:`safeopt.adapter.gather`, the global clip with the threshold
    ``state`` puts in force.

    Args:
      run: The wrapper's runner.
      state: safeopt's state before this step.
      loss: The evaluation's loss, or ``None``.
      check: Read whether the loss and the gradients are finite (one host
        read); without it they count as finite.

    Returns:
      ``(stats, finite)``: the statistics (``None`` when no parameter has a
      gradient) and whether loss and gradients are finite.
    """
    policy = run.policy
    groups = run.inner.param_groups
    batch = _batch.collect(groups, run.device, _batch.any_dtensor(groups))
    if not batch.grads:
        return None, True
    xp = run.xp
    k = TorchKernels(sa.namespace_by_name("torch"), batch, run.device, None, run.cache)
    grads, stats = sa.gather(k, policy, state, batch.grads, batch.local_params,
                             run.as_loss(loss), positions=batch.index,
                             n_tensors=run.n_tensors, due=False)
    if run.on_host:
        stats = sa.GradStats(*(host_value(v) for v in stats))
    finite = True
    if check:
        flag = xp.isfinite(stats.raw_norm)
        if stats.loss is not None:
            flag = xp.logical_and(flag, xp.isfinite(stats.loss))
        finite = bool(flag)
    if policy.clip_norm is not None and policy.norm_scope == "global":
        with np.errstate(all="ignore"):
            decision, _ = sa.decide(xp, policy, state, stats)
            scale = sa.clip_scale(xp, xp.astype(stats.norm, xp.float32), decision.threshold)
        if not run.on_host:
            k.scale(grads, scale)  # exactly 1 where it does not clip
        elif scale < 1.0:
            k.scale(grads, torch.tensor(scale))
    return stats, finite


def abandon(run: Runner, before: sa.State, stats: sa.GradStats) -> tuple[int, int]:
    """Counts an abandoned step as a skip of ``stats``.

    Returns:
      The skip streak and how many of its skips were non-finite (host reads).
    """
    with np.errstate(all="ignore"):
        _, run.state = sa.decide(run.xp, run.policy, before, stats)
    counters = run.state.counters
    return int(counters.consecutive_skips), int(counters.streak_nonfinite)
