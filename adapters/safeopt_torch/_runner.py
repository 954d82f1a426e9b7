"""safeopt's side of one wrapped torch optimizer: the policy, the state, and the step.

:class:`Runner` keeps safeopt's state (on the host, or on the parameters'
device), gathers each step's statistics with
:class:`~safeopt_torch._kernels.TorchKernels` (``safeopt.adapter.gather``)
and hands them to the path that decides and applies the decision
(:mod:`safeopt_torch._paths`; under ``torch.compile``,
:mod:`safeopt_torch._compiled`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch import _batch, _compiled, _paths, _stages
from safeopt_torch._kernels import IndexCache, TorchKernels
from safeopt_torch._recover import TorchRecovery
from safeopt_torch._stages import Stages
from safeopt_torch._watch import StreakWatch


def _host_copy(value: Any) -> Any:
    """A tensor (or array) as host data owning its memory (for state from a checkpoint)."""
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
        self.last_skip: Any = None  # the last step's skip flag (bool, or a device bool)
        self.pending_loss: Any = None  # set_loss's loss, for the next step
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

    def resync(self) -> int:
        """After compiled steps, reads the update count back once (the host mirror); returns it."""
        counters = self.host_state().counters
        self.updates = int(counters.steps) + int(counters.skips)
        self.mirror_stale = False
        return self.updates

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
        if amp_scale is not None and _paths.modifies_elements(policy):
            _paths.unscale(batch, amp_scale)  # once, as GradScaler.unscale_ does
            amp_scale = None
        k = TorchKernels(sa.namespace_by_name("torch"), batch, self.device, amp_scale,
                         self.cache)
        due = policy.monitor_every > 0 and self.updates % policy.monitor_every == 0
        grads, stats = sa.gather(k, policy, self.state, batch.grads, batch.local_params,
                                 self.as_loss(loss), positions=batch.index,
                                 n_tensors=self.n_tensors, due=due)
        if self.stages is not None:  # the whole model's statistics, from every stage's
            stats = self.stages.combine(stats, self.device)
        if stats.loss is not None:  # one loss for every data-parallel replica
            stats = stats._replace(loss=_stages.mean_over_ranks(stats.loss))
        if self.on_host:
            return _paths.host(self, k, grads, stats, inner_step, fused, amp_scale, amp_inf)
        return _paths.device(self, k, grads, stats, inner_step, fused, inner_ready, amp_scale,
                             amp_inf)

    def compiled_step(self, inner_step: Any, loss: Any) -> None:
        """The step traced by ``torch.compile`` (see :mod:`safeopt_torch._compiled`)."""
        _compiled.step(self, inner_step, self.as_loss(loss))

    def as_loss(self, loss: Any) -> Tensor | None:
        """``loss`` (a tensor or a number) as a float32 0-d tensor on the device, or ``None``."""
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            return loss.detach().to(self.device, torch.float32).reshape(())
        return torch.full((), float(loss), dtype=torch.float32, device=self.device)


def _n_tensors(inner: torch.optim.Optimizer) -> int:
    return sum(len(group["params"]) for group in inner.param_groups)
