"""How a protected step applies its decision: the host, fused and foreach paths.

:class:`~safeopt_torch._runner.Runner` gathers the statistics; the functions
here decide and hand the decision to the inner optimizer on one of two
paths, reported by ``safeopt.stats(opt)["path"]``:

``"fused"``
  The inner optimizer has a fused kernel that reads ``grad_scale`` and
  ``found_inf`` (``Adam``, ``AdamW``, ``SGD`` with ``fused=True``; ``Adagrad``
  with ``fused=True`` on CPU): the global clip scale goes in as
  ``grad_scale`` (``1 / scale``, which the kernel divides by) and the skip
  flag as ``found_inf`` (exactly 0.0 or 1.0; the kernel then leaves
  parameters and moments alone and rolls its step counter back), the way
  ``torch.amp.GradScaler`` drives them (:func:`_fused`). The protected step
  reads the gradients once more than a bare step (the foreach norm) and never
  waits for the device. The divergence guard copies the skip streak to pinned
  host memory every step without blocking and reads the copy made
  :data:`~safeopt_torch._watch.LAG` (2) steps earlier, so on an accelerator
  :class:`safeopt.DivergenceError` comes exactly two steps after the step
  that reached ``max_consecutive_skips``, on every rank alike (on CPU at
  once); see :mod:`safeopt_torch._watch`. While the inner optimizer has not
  created its state yet (its first step), the step takes the ``"foreach"``
  path once, because a kernel-level skip cannot undo lazily created state
  (e.g. fused SGD's first momentum buffer); an inner optimizer that already
  holds state for every parameter (loaded from a checkpoint, or ``Adagrad``)
  starts on the fused path.
``"foreach"``
  Any other optimizer: the gradients are scaled with ``torch._foreach_mul_``
  and the inner ``step`` is not called on a skipped step; the skip flag,
  the skip streak and the clip flag are read in one host transfer
  (:func:`_sync`, one synchronisation per step).

Where the decision is taken (``decisions``):

``"device"`` (accelerators, :func:`device`)
  ``safeopt.decide`` runs with the torch namespace on the device, and the
  paths above hand its outputs to the kernels as tensors.
``"host"`` (CPU, the default there; :func:`host`)
  On CPU the device is the host: there is no synchronisation to avoid, and
  what costs is the work itself. The statistics are still computed by torch
  kernels (the same values as on the device path), then the decision runs in
  the core's ``"host"`` namespace (NumPy scalars, a few microseconds per
  operation instead of a torch dispatch each), safeopt's state stays in
  host memory, and the decision is applied by plain branching: a skipped step
  calls no kernel at all, and a fused kernel is handed ``grad_scale`` only on
  the steps that clip. That matters because torch's CPU fused kernels divide
  every gradient by ``grad_scale`` and write it back whenever it is given
  (about 0.15x of a fused AdamW step on a two-core machine, whether the scale
  is 1 or not). Parameters, moments and safeopt's state come out
  bit-identical to the ``"device"`` path (a test checks it).

With ``torch.amp.GradScaler``: on the fused path the wrapper declares
``_step_supports_amp_scaling`` like the fused optimizers do, so the scaler
hands it ``grad_scale`` / ``found_inf``; safeopt divides its statistics by
the loss scale (so decisions are taken on unscaled gradients), multiplies the
loss scale into the kernel's ``grad_scale``, and an AMP overflow skips the
step without touching safeopt's state (it is the scaler's business, not
counted as a safeopt skip). On the ``"foreach"`` path the scaler unscales the
gradients itself and does not call ``step`` on an overflow (its own
``.item()`` comes on top of safeopt's one synchronisation).

The compiled step is :mod:`safeopt_torch._compiled`'s.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch import _batch
from safeopt_torch._kernels import TorchKernels

if TYPE_CHECKING:
    from safeopt_torch._runner import Runner

Streak = tuple[int, int] | None


def host_value(value: Any) -> Any:
    """A CPU tensor as host data: a NumPy scalar for 0-d, else an ndarray view."""
    if not isinstance(value, Tensor):
        return value
    array = value.detach().numpy()
    return array[()] if array.ndim == 0 else array


def host(run: Runner, k: TorchKernels, grads: list[Tensor], stats: sa.GradStats,
         inner_step: Any, fused: bool, amp_scale: Tensor | None,
         amp_inf: Tensor | None) -> Streak:
    """Decides on the host and applies the decision by branching (CPU)."""
    host_stats = sa.GradStats(*(host_value(v) for v in stats))
    with np.errstate(all="ignore"):
        decision, new = sa.decide(run.xp, run.policy, run.state, host_stats)
    if amp_inf is not None and bool(np.any(host_value(amp_inf) > 0)):
        run.last_skip = True  # the scaler's skip, not safeopt's: nothing else changes
        return None
    before, t = run.state, run.updates
    run.state = new
    run.updates += 1
    run.last_skip = bool(decision.skip)
    if run.recovery is not None:
        run.state = run.recovery.host(decision, before, new, t, run.owner)
    if not decision.skip:
        clipped = bool(decision.clipped) and global_clip(run.policy)
        with backed_off(run, t):
            if fused:
                inv = sa.inverse_scale(run.xp, host_stats.norm, decision.threshold,
                                       clipped) if clipped else None
                inner_step(grad_scale(None if inv is None else torch.tensor(inv),
                                      amp_scale, run.device), None)
            else:
                if clipped:
                    k.scale(grads, torch.tensor(decision.scale))
                inner_step(None, None)
    c = run.state.counters
    return int(c.consecutive_skips), int(c.streak_nonfinite)


def device(run: Runner, k: TorchKernels, grads: list[Tensor], stats: sa.GradStats,
           inner_step: Any, fused: bool, inner_ready: bool, amp_scale: Tensor | None,
           amp_inf: Tensor | None) -> Streak:
    """Decides on the device; the fused path reads nothing, the foreach path once."""
    decision, new = sa.decide(k.xp, run.policy, run.state, stats)
    if amp_inf is not None:  # an AMP overflow is the scaler's, not a safeopt skip
        overflow = amp_inf.to(run.device) > 0
        new = sa.map_state(lambda a, b: torch.where(overflow, a, b), run.state, new)
    if run.recovery is not None:
        run.recovery.before_device_update(run.updates, run.state)
    run.updates += 1
    if fused and inner_ready:
        return _fused(run, decision, stats, new, inner_step, amp_scale, amp_inf)
    return _sync(run, k, grads, decision, stats, new, inner_step, fused, amp_scale, amp_inf)


def backed_off(run: Runner, t: int) -> Any:
    """The learning-rate back-off after a recovery (nothing without one)."""
    return contextlib.nullcontext() if run.recovery is None else run.recovery.backed_off(t)


def _fused(run: Runner, decision: sa.Decision, stats: sa.GradStats, new: sa.State,
           inner_step: Any, amp_scale: Tensor | None, amp_inf: Tensor | None) -> Streak:
    """Hands scale and skip to the fused kernel: no host synchronisation."""
    xp = sa.namespace_by_name("torch")
    policy = run.policy
    found_inf = xp.astype(decision.skip, torch.float32) if can_skip(policy) else None
    run.last_skip = decision.skip
    if amp_inf is not None:
        amp = torch.clamp(amp_inf.to(run.device, torch.float32), max=1.0)
        found_inf = amp if found_inf is None else torch.maximum(found_inf, amp)
        run.last_skip = found_inf > 0  # an AMP overflow skips too
    inv = None
    if global_clip(policy):
        inv = sa.inverse_scale(xp, xp.astype(stats.norm, torch.float32), decision.threshold,
                               decision.clipped)
    t = run.updates - 1
    with backed_off(run, t):
        inner_step(grad_scale(inv, amp_scale, run.device), found_inf)
    run.state = new
    if run.recovery is not None:
        return _device_flags(run, decision, new, t)
    if policy.max_consecutive_skips is None or not can_skip(policy):
        return None
    c = new.counters
    streak = run.watch.push(torch.stack([c.consecutive_skips, c.streak_nonfinite]))
    return None if streak is None else (streak[0], streak[1])


def _device_flags(run: Runner, decision: sa.Decision, new: sa.State, t: int) -> Streak:
    """Reads the streak and the recovery flags with the guard; snapshots, restores."""
    assert run.recovery is not None
    assert decision.recover is not None and decision.snapshot is not None
    c = new.counters
    read = run.watch.push(torch.stack([
        c.consecutive_skips, c.streak_nonfinite, decision.recover.to(torch.int32),
        decision.snapshot.to(torch.int32)]))
    if read is None:
        return None
    streak, nonfinite, recover, snapshot = read
    run.state = run.recovery.flags(t - run.watch.last_lag, bool(recover), bool(snapshot),
                                   run.state, t, run.owner)
    if run.state is not new:  # restored: the streak is over
        return 0, 0
    return streak, nonfinite


def _sync(run: Runner, k: TorchKernels, grads: list[Tensor], decision: sa.Decision,
          stats: sa.GradStats, new: sa.State, inner_step: Any, fused: bool,
          amp_scale: Tensor | None, amp_inf: Tensor | None) -> Streak:
    """Reads skip, streak and clip flag in one transfer; skips by not stepping.

    A policy that can never skip reads nothing: the global clip multiply
    then runs unconditionally, as in ``clip_grad_norm_``.
    """
    run.state = new
    run.last_skip = False
    clip = global_clip(run.policy)
    if not can_skip(run.policy) and amp_inf is None:
        apply(k, grads, decision, stats, inner_step, fused, amp_scale, clip)
        return None
    overflow = None if amp_inf is None else amp_inf.to(run.device) > 0
    flags = read_flags(decision.skip, decision.clipped, overflow, new.counters,
                       decision.recover, decision.snapshot)
    skip, clipped, amp_overflow, recover, snapshot, streak, nonfinite = flags
    run.last_skip = skip or amp_overflow
    t = run.updates - 1
    if run.recovery is not None:
        run.state = run.recovery.flags(t, recover, snapshot, new, t, run.owner)
        if run.state is not new:  # restored: the streak is over
            return 0, 0
    if not (skip or amp_overflow):
        with backed_off(run, t):
            apply(k, grads, decision, stats, inner_step, fused, amp_scale, clip and clipped)
    return streak, nonfinite


def apply(k: TorchKernels, grads: list[Tensor], decision: sa.Decision, stats: sa.GradStats,
          inner_step: Any, fused: bool, amp_scale: Tensor | None, clip: bool) -> None:
    """Runs the inner step with the global clip applied (``clip``: there is one)."""
    if fused:
        inv = sa.inverse_scale(k.xp, stats.norm, decision.threshold, decision.clipped) \
            if clip else None
        inner_step(grad_scale(inv, amp_scale, k.device), None)
    else:
        if clip:
            k.scale(grads, decision.scale)
        inner_step(None, None)


_STREAK_BITS = 29
_FLAG_BITS = 5


def read_flags(skip: Tensor, clipped: Tensor, overflow: Tensor | None, counters: Any,
               recover: Tensor | None = None, snapshot: Tensor | None = None,
               ) -> tuple[bool, bool, bool, bool, bool, int, int]:
    """Reads the decision's flags and the skip streak in one transfer (one ``item()``).

    They are packed into one int64 on the device (five flag bits: skip,
    clipped, AMP overflow, recover, snapshot; then the NaN/Inf count of the
    streak and the streak, each clamped to 2**29 - 1), so the sync path reads
    the device exactly once per step.
    """
    cap = (1 << _STREAK_BITS) - 1
    packed = skip.to(torch.int64) + 2 * clipped.to(torch.int64)
    for bit, flag in ((4, overflow), (8, recover), (16, snapshot)):
        if flag is not None:
            packed = packed + bit * flag.to(torch.int64)
    packed = packed + (counters.streak_nonfinite.to(torch.int64).clamp(max=cap) << _FLAG_BITS)
    packed = packed + (counters.consecutive_skips.to(torch.int64).clamp(max=cap)
                       << (_FLAG_BITS + _STREAK_BITS))
    value = int(packed.item())
    return (bool(value & 1), bool(value & 2), bool(value & 4), bool(value & 8),
            bool(value & 16), value >> (_FLAG_BITS + _STREAK_BITS),
            (value >> _FLAG_BITS) & cap)


def can_skip(policy: Policy) -> bool:
    """Whether the policy may skip an update (then the foreach path reads the device)."""
    return policy.skip_nonfinite or policy.spike_skip is not None


def global_clip(policy: Policy) -> bool:
    """Whether the policy clips the global norm (a scale for the whole update)."""
    return policy.clip_norm is not None and policy.norm_scope == "global"


def modifies_elements(policy: Policy) -> bool:
    """Whether the policy changes gradients element by element (then AMP unscales first)."""
    return policy.has_penalty or policy.clip_value is not None or (
        policy.clip_norm is not None and policy.norm_scope != "global")


def grad_scale(inv_scale: Tensor | None, amp_scale: Tensor | None,
               device: torch.device) -> Tensor | None:
    """The fused kernel's ``grad_scale``: the clip divisor times the AMP loss scale."""
    if amp_scale is None:
        return inv_scale
    amp = amp_scale.to(device, torch.float32)
    return amp if inv_scale is None else amp * inv_scale.to(device)


def unscale(batch: _batch.Batch, divisor: Tensor) -> None:
    """Divides every gradient by the 0-d ``divisor`` (AMP unscaling), in place."""
    inverse = torch.reciprocal(divisor.to(torch.float32))
    for (device, _), grads in zip(batch.groups, batch.split(batch.grads)):
        torch._foreach_mul_(grads, inverse.to(device if device is not None else inverse.device,
                                              grads[0].dtype))
