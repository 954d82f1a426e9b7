"""The protected step of :class:`~safeopt_torch.SafeOptimizer`: the core's pipeline in torch.

Every step gathers the statistics with :class:`~safeopt_torch._kernels.TorchKernels`
(``safeopt.adapter.gather``), decides (``safeopt.adapter.decide``) and applies
the decision on one of two paths:

``"fused"``
  The inner optimizer has a fused kernel that reads ``grad_scale`` and
  ``found_inf`` (``Adam``, ``AdamW``, ``SGD`` with ``fused=True``; ``Adagrad``
  with ``fused=True`` on CPU): the global clip scale goes in as
  ``grad_scale`` (``1 / scale``, which the kernel divides by) and the skip
  flag as ``found_inf``, the way ``torch.amp.GradScaler`` drives them.
``"foreach"``
  Any other optimizer: the gradients are scaled with ``torch._foreach_mul_``
  and the inner ``step`` is not called on a skipped step; the skip flag,
  the skip streak and the clip flag are read in one host transfer.

Where the decision is taken (``decisions``): on the device (accelerators;
the core runs with the torch namespace and its outputs reach the kernels as
tensors), or on the host (CPU, where the device is the host: the statistics
are read once and the core runs on NumPy scalars, and the decision is
applied by branching, so a skipped step calls no kernel and a fused kernel
gets ``grad_scale`` only on steps that clip).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch import _batch
from safeopt_torch._kernels import IndexCache, TorchKernels
from safeopt_torch._recover import TorchRecovery
from safeopt_torch._stages import Stages
from safeopt_torch._watch import StreakWatch


def _host(value: Any) -> Any:
    """A CPU tensor as host data: a NumPy scalar for 0-d, else an ndarray view."""
    if not isinstance(value, Tensor):
        return value
    array = value.detach().numpy()
    return array[()] if array.ndim == 0 else array


def _host_copy(value: Any) -> Any:
    """Like :func:`_host`, owning its memory (for state loaded from a checkpoint)."""
    array = np.array(value.detach().cpu().numpy() if isinstance(value, Tensor) else value)
    return array[()] if array.ndim == 0 else array


class Runner:
    """safeopt's side of one wrapped optimizer: policy, state, and the step.

    Args:
      inner: The wrapped optimizer.
      policy: The policy in force.
      on_host: Decide on the host (CPU) rather than on the device.
      device: Where the parameters (and a device state) live.
    """

    def __init__(self, inner: torch.optim.Optimizer, policy: Policy, on_host: bool,
                 device: torch.device) -> None:
        self.inner = inner
        self.policy = policy
        self.on_host = on_host
        self.device = device
        self.cache: IndexCache = {}
        self.shards: dict[Any, Any] = {}  # shard reductions, by parameter layout
        self.stages: Stages | None = None  # the pipeline stages, when declared
        self.watch = StreakWatch()
        self.updates = 0  # host mirror of steps + skips: the monitor's cadence
        self.mirror_stale = False  # compiled steps do not keep the host mirror
        self.last_skip: Any = None  # the last decision's skip flag (bool, or a device bool)
        self.n_tensors = _n_tensors(inner)
        self.state = self.fresh_state()
        self.recovery = TorchRecovery(inner, policy) if policy.recover else None
        self.owner: Any = None  # the SafeOptimizer, for the diagnosis of an error

    # -- state -------------------------------------------------------------------
    @property
    def xp(self) -> sa.Namespace:
        return sa.namespace_by_name("host" if self.on_host else "torch")

    def fresh_state(self) -> sa.State:
        """A new state for the current parameters (on the host, or on their device)."""
        like = None if self.on_host else torch.empty((), device=self.device)
        return sa.init_state(self.xp, self.policy, self.n_tensors, like)

    def tensors(self) -> dict[str, Tensor]:
        """The state as ``{"feature.field": tensor}`` (copies), wherever it lives."""
        return {key: torch.tensor(np.asarray(v)) if self.on_host else v.detach().clone()
                for key, v in sa.flatten(self.state).items()}

    def load(self, flat: dict[str, Any]) -> None:
        """Loads ``flat`` (keys as :meth:`tensors` makes them, or a safeopt 0.1 state)."""
        if sa.is_legacy(flat):
            flat = sa.upgrade({k: _host_copy(v) for k, v in flat.items()})

        def convert(value: Any, current: Any) -> Any:
            if self.on_host:
                return np.asarray(_host_copy(value), dtype=np.asarray(current).dtype)[()] \
                    if np.ndim(current) == 0 else np.asarray(_host_copy(value),
                                                             dtype=current.dtype)
            return torch.as_tensor(np.asarray(_host_copy(value))).to(current.device,
                                                                      current.dtype)

        self.state = sa.unflatten(self.fresh_state(), flat, convert)
        counters = self.state.counters
        self.updates = int(np.asarray(_host_copy(counters.steps))) + int(
            np.asarray(_host_copy(counters.skips)))

    def resize(self) -> None:
        """Grows the per-tensor fields after parameters were added (new entries start fresh)."""
        self.n_tensors = _n_tensors(self.inner)
        old, fresh = sa.flatten(self.state), self.fresh_state()
        cat = np.concatenate if self.on_host else torch.cat
        grown = {}
        for key, new in sa.flatten(fresh).items():
            was = old.get(key)
            if was is not None and np.ndim(was) == 1 and np.shape(was)[0] < np.shape(new)[0]:
                grown[key] = cat([was, new[np.shape(was)[0]:]])
            elif was is not None:
                grown[key] = was
        self.state = sa.unflatten(fresh, grown)

    def host_state(self) -> sa.State:
        """The state as NumPy arrays (a host synchronisation on an accelerator)."""
        return sa.map_state(lambda v: np.array(v.detach().cpu().numpy()) if isinstance(
            v, Tensor) else np.array(v), self.state)

    # -- the step ----------------------------------------------------------------------
    def step(self, inner_step: Any, fused: bool, inner_ready: bool, loss: Any,
             amp_scale: Tensor | None, amp_inf: Tensor | None) -> tuple[int, int] | None:
        """Runs one protected step.

        Returns:
          The skip streak and how many of its skips carried NaN/Inf, as read
          this step (on the fused path on an accelerator, the streak of
          :data:`~safeopt_torch._watch.LAG` steps ago); ``None`` when nothing
          was read (a policy that cannot skip or stop reads nothing).

        Args:
          inner_step: Runs the inner optimizer's step: ``inner_step(grad_scale, found_inf)``.
          fused: The inner optimizer reads ``grad_scale``/``found_inf``.
          inner_ready: It has created its state (a kernel-level skip cannot undo
            lazily created state, so its first step takes the foreach path).
          loss: The step's loss (tensor or number), or ``None``.
          amp_scale: ``GradScaler``'s scale, when it drives the wrapper.
          amp_inf: ``GradScaler``'s overflow flag, likewise.
        """
        batch = _batch.collect(self.inner.param_groups, self.device,
                               _batch.any_dtensor(self.inner.param_groups), self.shards)
        if not batch.grads:
            return None
        policy = self.policy
        if amp_scale is not None and _modifies_elements(policy):
            _unscale(batch, amp_scale)  # once, as GradScaler.unscale_ does
            amp_scale = None
        k = TorchKernels(sa.namespace_by_name("torch"), batch, self.device, amp_scale,
                         self.cache)
        due = policy.monitor_every > 0 and self.updates % policy.monitor_every == 0
        grads, stats = sa.gather(k, policy, self.state, batch.grads, batch.local_params,
                                 self._loss(loss), positions=batch.index,
                                 n_tensors=self.n_tensors, due=due)
        if self.stages is not None:  # the whole model's statistics, from every stage's
            stats = self.stages.combine(stats, self.device)
        if self.on_host:
            return self._host(k, grads, stats, inner_step, fused, amp_scale, amp_inf)
        decision, new = sa.decide(k.xp, policy, self.state, stats)
        if amp_inf is not None:  # an AMP overflow is the scaler's, not a safeopt skip
            overflow = amp_inf.to(self.device) > 0
            new = sa.map_state(lambda a, b: torch.where(overflow, a, b), self.state, new)
        if self.recovery is not None:
            self.recovery.before_device_update(self.updates, self.state)
        self.updates += 1
        if fused and inner_ready:
            return self._fused(decision, stats, new, inner_step, amp_scale, amp_inf)
        return self._sync(k, grads, decision, stats, new, inner_step, fused, amp_scale, amp_inf)

    def compiled_step(self, inner_step: Any, fused: bool, loss: Any) -> None:
        """The step traced by ``torch.compile``: device decisions, no host read at all.

        torch does not trace its fused kernels (``_fused_adam`` is
        ``torch.compiler.disable``-d), so a fused inner optimizer runs its
        foreach implementation here, which inductor fuses; and a compiled
        graph cannot branch on the device, so the inner step runs and a
        skipped one is undone by a select, ``where(skip, before, after)``, over
        the parameters and the optimizer state (copied before the step; state
        the step creates is put back to zeros, what Adam-like optimizers
        create). The monitor's weight norm is gathered under ``torch.cond`` on
        the device counters; the host-side counters and telemetry are left to
        eager steps.
        """
        if self.on_host:
            raise RuntimeError(
                "A compiled protected step must decide on the device: build the wrapper with "
                "SafeOptimizer(optimizer, policy, decide_on='device') (the default on an "
                "accelerator). Received: decide_on resolved to 'host' (parameters on CPU).")
        batch = _batch.collect(self.inner.param_groups, self.device,
                               _batch.any_dtensor(self.inner.param_groups), self.shards)
        if not batch.grads:
            return
        k = TorchKernels(sa.namespace_by_name("torch"), batch, self.device, None, self.cache)
        grads, stats = sa.gather(k, self.policy, self.state, batch.grads, batch.local_params,
                                 self._loss(loss), positions=batch.index,
                                 n_tensors=self.n_tensors)
        if self.stages is not None:
            stats = self.stages.combine(stats, self.device)
        decision, new = sa.decide(k.xp, self.policy, self.state, stats)
        global_clip = _global_clip(self.policy)
        with _foreach_under_compile(self.inner):
            _undo_if_skipped(self.inner, batch, decision.skip, lambda: self._apply(
                k, grads, decision, stats, inner_step, False, None, global_clip))
        self.state = new
        self.last_skip = decision.skip
        self.mirror_stale = True

    def _host(self, k: TorchKernels, grads: list[Tensor], stats: sa.GradStats, inner_step: Any,
              fused: bool, amp_scale: Tensor | None,
              amp_inf: Tensor | None) -> tuple[int, int] | None:
        """Decides on the host and applies the decision by branching (CPU)."""
        host_stats = sa.GradStats(*(_host(v) for v in stats))
        with np.errstate(all="ignore"):
            decision, new = sa.decide(self.xp, self.policy, self.state, host_stats)
        if amp_inf is not None and bool(np.any(_host(amp_inf) > 0)):
            return None  # an AMP overflow is the scaler's, not a safeopt skip: nothing changes
        before, t = self.state, self.updates
        self.state = new
        self.updates += 1
        self.last_skip = bool(decision.skip)
        if self.recovery is not None:
            self.state = self.recovery.host(decision, before, new, t, self.owner)
        if not decision.skip:
            clipped = bool(decision.clipped) and _global_clip(self.policy)
            with self._backed_off(t):
                if fused:
                    inv = sa.inverse_scale(self.xp, host_stats.norm, decision.threshold,
                                           clipped) if clipped else None
                    inner_step(_grad_scale(None if inv is None else torch.tensor(inv),
                                           amp_scale, self.device), None)
                else:
                    if clipped:
                        k.scale(grads, torch.tensor(decision.scale))
                    inner_step(None, None)
        c = self.state.counters
        return int(c.consecutive_skips), int(c.streak_nonfinite)

    def _backed_off(self, t: int) -> Any:
        """The learning-rate back-off after a recovery (nothing without one)."""
        return contextlib.nullcontext() if self.recovery is None else \
            self.recovery.backed_off(t)

    def _fused(self, decision: sa.Decision, stats: sa.GradStats, new: sa.State,
               inner_step: Any, amp_scale: Tensor | None,
               amp_inf: Tensor | None) -> tuple[int, int] | None:
        """Hands scale and skip to the fused kernel: no host synchronisation."""
        xp = sa.namespace_by_name("torch")
        found_inf = xp.astype(decision.skip, torch.float32) if _can_skip(self.policy) else None
        if amp_inf is not None:
            amp = torch.clamp(amp_inf.to(self.device, torch.float32), max=1.0)
            found_inf = amp if found_inf is None else torch.maximum(found_inf, amp)
        inv = None
        if _global_clip(self.policy):
            inv = sa.inverse_scale(xp, xp.astype(stats.norm, torch.float32), decision.threshold,
                                   decision.clipped)
        t = self.updates - 1
        with self._backed_off(t):
            inner_step(_grad_scale(inv, amp_scale, self.device), found_inf)
        self.state = new
        self.last_skip = decision.skip
        if self.recovery is not None:
            return self._device_flags(decision, new, t)
        if self.policy.max_consecutive_skips is None or not _can_skip(self.policy):
            return None
        c = new.counters
        streak = self.watch.push(torch.stack([c.consecutive_skips, c.streak_nonfinite]))
        return None if streak is None else (streak[0], streak[1])

    def _device_flags(self, decision: sa.Decision, new: sa.State,
                      t: int) -> tuple[int, int] | None:
        """Reads the streak and the recovery flags with the guard; snapshots, restores."""
        assert self.recovery is not None
        assert decision.recover is not None and decision.snapshot is not None
        c = new.counters
        read = self.watch.push(torch.stack([
            c.consecutive_skips, c.streak_nonfinite, decision.recover.to(torch.int32),
            decision.snapshot.to(torch.int32)]))
        if read is None:
            return None
        streak, nonfinite, recover, snapshot = read
        self.state = self.recovery.flags(t - self.watch.last_lag, bool(recover),
                                         bool(snapshot), self.state, t, self.owner)
        if self.state is not new:  # restored: the streak is over
            return 0, 0
        return streak, nonfinite

    def _sync(self, k: TorchKernels, grads: list[Tensor], decision: sa.Decision,
              stats: sa.GradStats, new: sa.State, inner_step: Any, fused: bool,
              amp_scale: Tensor | None, amp_inf: Tensor | None) -> tuple[int, int] | None:
        """Reads skip, streak and clip flag in one transfer; skips by not stepping.

        A policy that can never skip reads nothing: the global clip multiply
        then runs unconditionally, as in ``clip_grad_norm_``.
        """
        self.state = new
        self.last_skip = False
        global_clip = _global_clip(self.policy)
        if not _can_skip(self.policy) and amp_inf is None:
            self._apply(k, grads, decision, stats, inner_step, fused, amp_scale, global_clip)
            return None
        overflow = None if amp_inf is None else amp_inf.to(self.device) > 0
        flags = _read_flags(decision.skip, decision.clipped, overflow, new.counters,
                            decision.recover, decision.snapshot)
        skip, clipped, amp_overflow, recover, snapshot, streak, nonfinite = flags
        self.last_skip = skip
        t = self.updates - 1
        if self.recovery is not None:
            self.state = self.recovery.flags(t, recover, snapshot, new, t, self.owner)
            if self.state is not new:  # restored: the streak is over
                return 0, 0
        if not (skip or amp_overflow):
            with self._backed_off(t):
                self._apply(k, grads, decision, stats, inner_step, fused, amp_scale,
                            global_clip and clipped)
        return streak, nonfinite

    def _apply(self, k: TorchKernels, grads: list[Tensor], decision: sa.Decision,
               stats: sa.GradStats, inner_step: Any, fused: bool, amp_scale: Tensor | None,
               clip: bool) -> None:
        """Runs the inner step with the global clip applied (``clip``: there is one)."""
        if fused:
            inv = sa.inverse_scale(k.xp, stats.norm, decision.threshold, decision.clipped) \
                if clip else None
            inner_step(_grad_scale(inv, amp_scale, self.device), None)
        else:
            if clip:
                k.scale(grads, decision.scale)
            inner_step(None, None)

    def _loss(self, loss: Any) -> Tensor | None:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            return loss.detach().to(self.device, torch.float32).reshape(())
        return torch.full((), float(loss), dtype=torch.float32, device=self.device)


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


_STREAK_BITS = 29


_FLAG_BITS = 5


def _read_flags(skip: Tensor, clipped: Tensor, overflow: Tensor | None, counters: Any,
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


def _n_tensors(inner: torch.optim.Optimizer) -> int:
    return sum(len(group["params"]) for group in inner.param_groups)


def _can_skip(policy: Policy) -> bool:
    return policy.skip_nonfinite or policy.spike_skip is not None


def _global_clip(policy: Policy) -> bool:
    return policy.clip_norm is not None and policy.norm_scope == "global"


def _modifies_elements(policy: Policy) -> bool:
    return policy.has_penalty or policy.clip_value is not None or (
        policy.clip_norm is not None and policy.norm_scope != "global")


def _grad_scale(inv_scale: Tensor | None, amp_scale: Tensor | None,
                device: torch.device) -> Tensor | None:
    """The fused kernel's ``grad_scale``: the clip divisor times the AMP loss scale."""
    if amp_scale is None:
        return inv_scale
    amp = amp_scale.to(device, torch.float32)
    return amp if inv_scale is None else amp * inv_scale.to(device)


def _unscale(batch: _batch.Batch, divisor: Tensor) -> None:
    """Divides every gradient by the 0-d ``divisor`` (AMP unscaling), in place."""
    inverse = torch.reciprocal(divisor.to(torch.float32))
    for (device, _), grads in zip(batch.groups, batch.split(batch.grads)):
        torch._foreach_mul_(grads, inverse.to(device if device is not None else inverse.device,
                                              grads[0].dtype))
