"""The protected step under ``torch.compile``: device decisions, no host read at all.

torch does not trace its fused kernels (``_fused_adam`` is
``torch.compiler.disable``-d), so a fused inner optimizer runs its foreach
implementation here, which inductor fuses; and a compiled graph cannot
branch on the device, so the inner step runs and a skipped one is undone by
a select, ``where(skip, before, after)``, over the parameters and the
optimizer state (copied before the step; state the step creates is put back
to zeros, what Adam-like optimizers create). The monitor's weight norm is
gathered under ``torch.cond`` on the device counters; the host-side counters
and telemetry are left to eager steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

import safeopt.adapter as sa
from safeopt_torch import _batch, _paths
from safeopt_torch._kernels import TorchKernels

if TYPE_CHECKING:
    from safeopt_torch._runner import Runner


def step(run: Runner, inner_step: Any, loss: Tensor | None) -> None:
    """Gathers, decides and applies one step of ``run``, all of it traceable."""
    if run.on_host:
        raise RuntimeError(
            "A compiled protected step must decide on the device: build the wrapper with "
            "SafeOptimizer(optimizer, policy, decide_on='device') (the default on an "
            "accelerator). Received: decide_on resolved to 'host' (parameters on CPU).")
    batch = _batch.collect(run.inner.param_groups, run.device,
                           _batch.any_dtensor(run.inner.param_groups), run.shards)
    if not batch.grads:
        return
    k = TorchKernels(sa.namespace_by_name("torch"), batch, run.device, None, run.cache)
    grads, stats = sa.gather(k, run.policy, run.state, batch.grads, batch.local_params,
                             loss, positions=batch.index, n_tensors=run.n_tensors)
    if run.stages is not None:
        stats = run.stages.combine(stats, run.device)
    decision, new = sa.decide(k.xp, run.policy, run.state, stats)
    clip = _paths.global_clip(run.policy)
    with _foreach_under_compile(run.inner):
        _undo_if_skipped(run.inner, batch, decision.skip, lambda: _paths.apply(
            k, grads, decision, stats, inner_step, False, None, clip))
    run.state = new
    run.last_skip = decision.skip
    run.mirror_stale = True


@contextlib.contextmanager
def _foreach_under_compile(inner: torch.optim.Optimizer) -> Iterator[None]:
    """Runs a fused inner optimizer's foreach implementation (traceable) meanwhile."""
    fused = [group.get("fused") for group in inner.param_groups]
    for group in inner.param_groups:
        if group.get("fused"):
            group["fused"], group["foreach"] = False, True
    try:
        yield
    finally:
        for group, was in zip(inner.param_groups, fused):
            if was:
                group["fused"], group["foreach"] = True, None


def _undo_if_skipped(inner: torch.optim.Optimizer, batch: _batch.Batch, skip: Tensor,
                     run: Any) -> None:
    """Runs ``run()`` (the inner step), then puts everything back where ``skip``."""
    before = [*batch.params, *(v for p in batch.params
                               for v in inner.state.get(p, {}).values()
                               if isinstance(v, Tensor))]
    saved = [t.clone() for t in before]
    run()
    for t, old in zip(before, saved):
        t.copy_(torch.where(skip, old, t))
    known = {id(t) for t in before}
    for p in batch.params:  # state this step created: Adam-like optimizers start at zero
        for v in inner.state.get(p, {}).values():
            if isinstance(v, Tensor) and id(v) not in known:
                v.copy_(torch.where(skip, torch.zeros_like(v), v))
