"""``SafeOptimizer``: a ``torch.optim.Optimizer`` that protects another one.

Every step gathers gradient statistics with foreach kernels, calls the
core's :func:`safeopt.decide` with the torch namespace, and applies the
decision on one of two paths, reported by ``safeopt.stats(opt)["path"]``:

``"fused"``
  The inner optimizer has a fused kernel that reads ``grad_scale`` and
  ``found_inf`` (``Adam``, ``AdamW`` and ``SGD`` with ``fused=True``;
  ``Adagrad`` with ``fused=True`` on CPU). The norm-clip scale goes in as
  ``grad_scale`` (``1 / scale``, the kernel divides by it) and the skip flag as
  ``found_inf`` (exactly 0.0 or 1.0; the kernel then leaves parameters and
  moments alone and rolls its step counter back), the way
  ``torch.amp.GradScaler`` drives these kernels. The protected step reads the
  gradients once more than a bare step (the foreach norm) and never waits for
  the device. The divergence guard reads ``consecutive_skips`` without
  blocking: on CPU right after the step; on an accelerator the counter is
  copied to pinned host memory and read at the start of a later step, once
  the copy has landed (usually the next one), so
  :class:`safeopt.DivergenceError` may come one step late there. While the
  inner optimizer has not created its state yet (its first step), the step
  takes the ``"foreach"`` path once, because a kernel-level skip cannot undo
  lazily created state (e.g. fused SGD's first momentum buffer); an inner
  optimizer that already holds state for every parameter (loaded from a
  checkpoint, or ``Adagrad``) starts on the fused path.

``"foreach"``
  Any other optimizer. Statistics are the same foreach kernels; the skip
  flag, ``consecutive_skips`` and the clip flag are read in one host transfer
  (one synchronisation per step), the gradients are scaled with
  ``torch._foreach_mul_`` and the inner ``step`` is not called at all on a
  skipped step.

A policy that can never skip (``skip_nonfinite=False``, no ``spike_skip``)
reads nothing from the device on either path.

Where the decision is taken is a separate matter, reported by
``safeopt.stats(opt)["decisions"]``:

``"device"`` (accelerators)
  ``safeopt.decide`` runs with the torch namespace on the device, and the
  paths above hand its outputs to the kernels as tensors.

``"host"`` (CPU, the default there)
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
  bit-identical to the ``"device"`` path (a test checks it);
  ``SafeOptimizer(inner, policy, decide_on="device")`` forces the device
  path on CPU.

Under ``torch.compile`` the step is excluded from tracing
(``torch.compiler.disable``): a compiled training step graph-breaks at
``opt.step()`` and runs the protected step eagerly, so safeopt's state is
never traced into a graph (and compile time does not grow with the policy).

With ``torch.amp.GradScaler``: on the fused path the wrapper declares
``_step_supports_amp_scaling`` like the fused optimizers do, so the scaler
hands it ``grad_scale`` / ``found_inf``; safeopt divides its statistics by
the loss scale (so decisions are taken on unscaled gradients), multiplies the
loss scale into the kernel's ``grad_scale``, and an AMP overflow skips the
step without touching safeopt's state (it is the scaler's business, not
counted as a safeopt skip). On the ``"foreach"`` path the scaler unscales the
gradients itself and does not call ``step`` on an overflow (its own
``.item()`` comes on top of safeopt's one synchronisation).

Distributed: under DDP the gradients are already averaged, so every rank
takes the same decision (a NaN on one rank reaches all of them through the
all-reduce). Under FSDP2 (``fully_shard``, DTensor parameters) the per-tensor
squared norms of the local shards are summed across the ranks holding the
shards (one all-reduce of a small vector; a max all-reduce for
``clip_value``), so the global norm, the skip flag and the clip scale are
the same on every rank. Known limit: ``norm_scope="unitwise"`` under FSDP2
treats a sharded 1-d tensor (a bias) shard by shard.

Like ``clip_grad_norm_``, the wrapper leaves the clipped gradients in
``.grad`` (the fused kernels write back the gradient they divided by
``grad_scale``). Sparse gradients are refused.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063 (norm clipping).
  Brock, De, Smith & Simonyan (2021), High-Performance Large-Scale Image
  Recognition Without Normalization. https://arxiv.org/abs/2102.06171 (AGC).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

import safeopt
from safeopt import GradStats, Policy, PolicyState
from safeopt._telemetry import after_step
from safeopt_torch import _stats

_xp: Any = None


def _namespace() -> Any:
    global _xp
    if _xp is None:
        _xp = safeopt.namespace_by_name("torch")
    return _xp


def _host_namespace() -> Any:
    return safeopt.namespace_by_name("host")


def _fused_capable(inner: torch.optim.Optimizer) -> bool:
    """Whether ``inner``'s step reads ``grad_scale`` / ``found_inf`` attributes."""
    if not getattr(inner, "_step_supports_amp_scaling", False):
        return False
    if not all(group.get("fused") for group in inner.param_groups):
        return False
    import inspect

    return "grad_scaler" not in inspect.signature(inner.step).parameters


def _host(value: Any) -> Any:
    """A CPU tensor as host data: a NumPy scalar for 0-d, else an ndarray view."""
    if value is None:
        return None
    array = value.detach().numpy()
    return array[()] if array.ndim == 0 else array


def _host_copy(value: Any) -> Any:
    """Like :func:`_host`, but owning its memory (for state loaded from a checkpoint)."""
    array = value.detach().cpu().numpy().copy()
    return array[()] if array.ndim == 0 else array


class _HostWatch:
    """Reads ``consecutive_skips`` at a host boundary without blocking.

    On CPU the value is read right away (there is no device to wait for). On
    an accelerator it is copied with ``non_blocking=True`` into pinned memory
    and read at a later :meth:`poll`, once an event says the copy has landed.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._event: Any = None

    def push(self, counter: Tensor) -> int | None:
        """Starts reading ``counter``; returns it when it is readable now."""
        if counter.device.type == "cpu":
            return int(counter.detach().numpy())
        if self._buffer is None:
            self._buffer = torch.empty((), dtype=counter.dtype, pin_memory=True)
        self._buffer.copy_(counter.detach(), non_blocking=True)
        self._event = torch.Event(device=counter.device)
        self._event.record()
        return None

    def poll(self) -> int | None:
        """The counter pushed last, if its copy has completed (never blocks)."""
        if self._event is None or self._buffer is None or not self._event.query():
            return None
        self._event = None
        return int(self._buffer.numpy())


class SafeOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose every step follows a safeopt policy.

    Made by ``safeopt.wrap(optimizer, policy)``. It shares ``param_groups``,
    ``state`` and ``defaults`` with the inner optimizer, so LR schedulers,
    ``zero_grad``, ``add_param_group`` and hooks work on it as on the inner
    one. See the module docstring for the execution paths.

    Example:
      >>> import safeopt, torch
      >>> model = torch.nn.Linear(4, 2)
      >>> opt = safeopt.wrap(torch.optim.AdamW(model.parameters(), fused=True),
      ...                    {"clip_norm": 1.0})
      >>> model(torch.randn(8, 4)).square().mean().backward()
      >>> opt.step()
      >>> safeopt.stats(opt)["path"]
      'fused'
    """

    def __init__(self, inner: torch.optim.Optimizer, policy: Policy, *,
                 decide_on: str = "auto") -> None:
        """Wraps ``inner``.

        Args:
          inner: The optimizer to protect.
          policy: The policy in force.
          decide_on: ``"auto"`` (host on CPU, device elsewhere), ``"host"``
            (CPU only) or ``"device"``; see the module docstring.
        """
        # Optimizer.__init__ would build param groups of its own: the state is
        # the inner optimizer's, so only the hook tables are set up here.
        self._inner = inner
        self._policy = policy
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._fused = _fused_capable(inner)
        self._inner_ready = _has_state(inner)
        self._host_step = 0
        self._watch = _HostWatch()
        self._device = _first_device(inner)
        self._sharded = _stats.any_dtensor(inner.param_groups)
        self._on_host = _decide_on_host(decide_on, self._device)
        self._safe_state = self._fresh_state()

    # -- shared with the inner optimizer --------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's parameter groups (the same list)."""
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:
        """The inner optimizer's per-parameter state (the same dict)."""
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The inner optimizer's defaults."""
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    @property
    def _step_supports_amp_scaling(self) -> bool:  # read by torch.amp.GradScaler
        return self._fused

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._policy

    @property
    def path(self) -> str:
        """``"fused"`` or ``"foreach"`` (see the module docstring)."""
        return "fused" if self._fused else "foreach"

    @property
    def decisions(self) -> str:
        """``"host"`` or ``"device"``: where the decision is taken (see the module docstring)."""
        return "host" if self._on_host else "device"

    def __getattr__(self, name: str) -> Any:
        # Public attributes of the inner optimizer (e.g. custom ones) read through.
        if name.startswith("_") or name in ("grad_scale", "found_inf"):
            raise AttributeError(name)
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self) -> str:
        return (f"SafeOptimizer(path={self.path!r}, decisions={self.decisions!r}, "
                f"policy={self._policy!r},\n{self._inner!r})")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_watch"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_on_host", False)  # pickled before host decisions existed
        self._watch = _HostWatch()
        self._patch_step_function()

    # -- optimizer API ----------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients (the inner optimizer's ``zero_grad``)."""
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group to the inner optimizer; safeopt's per-tensor state grows."""
        self._inner.add_param_group(param_group)
        self._fused = _fused_capable(self._inner)
        self._sharded = _stats.any_dtensor(self._inner.param_groups)
        self._inner_ready = False
        self._resize_state()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus safeopt's state under ``"safeopt"``."""
        out = self._inner.state_dict()
        out["safeopt"] = {
            "state": dict(zip(PolicyState._fields, self._state_tensors())),
            "host_step": self._host_step,
            "policy": self._policy.to_dict(),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` returned (a plain inner state dict works too)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("safeopt", None)
        self._inner.load_state_dict(state_dict)
        self._inner_ready = _has_state(self._inner)
        if saved is None:
            return
        fresh = self._state_tensors()
        fields = {}
        for name, value, current in zip(PolicyState._fields, fresh, self._safe_state):
            old = saved["state"].get(name)
            if old is not None and tuple(old.shape) == tuple(value.shape):
                loaded = old.detach().to(value.device, value.dtype).clone()
                fields[name] = _host_copy(loaded) if self._on_host else loaded
            else:  # a field this checkpoint predates, or a resized buffer
                fields[name] = current
        self._safe_state = PolicyState(**fields)
        self._host_step = int(saved.get("host_step", 0))

    @torch.compiler.disable(recursive=True)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             loss: Any = None) -> Any:
        """Performs one protected optimisation step.

        Args:
          closure: Re-evaluates the model and returns the loss (optional).
          loss: This step's loss (a tensor or a number), for policies that
            read it (non-finite loss skips, ``spike_skip="loss"``); the
            closure's loss is used when it is not given.

        Returns:
          The closure's loss, if a closure was given.

        Raises:
          safeopt.DivergenceError: ``max_consecutive_skips`` steps in a row
            were skipped (on the fused path on an accelerator, possibly one
            step later).
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        streak = self._watch.poll()
        if streak is not None:
            safeopt.raise_if_diverged(self._policy, {"consecutive_skips": streak}, self)
        given = loss if loss is not None else closure_loss
        self._protected_step(given)
        self._host_step += 1
        if self._policy.log_every:  # one host read every log_every steps, else nothing
            after_step(self, self._host_step, self._policy)
        return closure_loss

    # -- the protected step -------------------------------------------------------
    def _protected_step(self, loss: Any) -> None:
        batch = _stats.collect(self.param_groups, self._device, self._sharded)
        if not batch.grads:
            return
        amp_scale, amp_inf = self._amp_inputs()
        if amp_scale is not None and self._modifies_elements():
            _stats.divide_all(batch, amp_scale)  # unscale once, as GradScaler.unscale_
            amp_scale = None
        stats = self._gather(batch, loss, amp_scale)
        if self._on_host:
            self._host_apply(batch, stats, amp_scale, amp_inf)
            return
        decision, new_state = safeopt.decide(_namespace(), self._policy, self._safe_state,
                                             stats)
        if amp_inf is not None:  # an AMP overflow is the scaler's, not a safeopt skip
            overflow = amp_inf.to(self._device) > 0
            new_state = PolicyState(*(torch.where(overflow, old, new) for old, new
                                      in zip(self._safe_state, new_state)))
        if self._fused and self._inner_ready:
            self._fused_apply(decision, new_state, amp_scale, amp_inf)
        else:
            self._sync_apply(batch, decision, new_state, amp_scale, amp_inf)

    def _gather(self, batch: _stats.Batch, loss: Any, amp_scale: Tensor | None) -> GradStats:
        """Runs penalty, value clip and scope clip on the gradients; returns the statistics."""
        policy, device = self._policy, self._device
        xp = _namespace()
        raw = _stats.tensor_norms(batch.grads, batch, device)
        if amp_scale is not None:
            raw = raw / amp_scale.to(device, torch.float32)
        raw_norm = _stats.global_norm(raw)
        weight_norm = None
        if policy.needs_weight_norm or self._monitor_step():
            weight_norm = _stats.global_norm(_stats.tensor_norms(batch.local_params, batch,
                                                                 device))
        if self._on_host:
            l1, l2 = safeopt.penalty_coefficients(_host_namespace(), policy, self._safe_state,
                                                  _host(weight_norm))
            l1, l2 = float(l1), float(l2)
        else:
            l1, l2 = safeopt.penalty_coefficients(xp, policy, self._safe_state, weight_norm)
        if policy.has_penalty:
            _stats.add_penalty(batch, l1, l2)
        biggest = None
        if policy.clip_value is not None:
            biggest = _stats.max_abs(batch.grads, batch, device)
            _stats.clamp(batch, policy.clip_value)
        changed = policy.has_penalty or policy.clip_value is not None
        norms = _stats.tensor_norms(batch.grads, batch, device) if changed else raw
        norm = _stats.global_norm(norms) if changed else raw_norm
        clipped = self._scope_clip(batch, norms)
        return GradStats(norm=norm, raw_norm=raw_norm, max_abs=biggest,
                         loss=self._loss_tensor(loss), clipped=clipped,
                         weight_norm=weight_norm, tensor_norms=self._full(raw, batch))

    def _scope_clip(self, batch: _stats.Batch, norms: Tensor) -> Tensor | None:
        """Per-tensor or unitwise (AGC) clipping, in place; global waits for the decision."""
        policy = self._policy
        if policy.clip_norm is None or policy.norm_scope == "global":
            return None
        xp = _namespace()
        if policy.norm_scope == "per_tensor":
            scales = safeopt.clip_scale(xp, norms, policy.clip_norm)
            _stats.scale_each(batch, scales)
            return torch.any(scales < 1.0)
        flags = []
        for g, w in zip(batch.grads, batch.local_params):
            scale = safeopt.unit_scale(
                xp, safeopt.unit_norms(xp, g.float(), 0), safeopt.unit_norms(xp, w.float(), 0),
                policy.clip_norm, policy.unitwise_eps)
            g.mul_(scale.to(g.dtype))
            flags.append(torch.any(scale < 1.0).to(self._device))
        return torch.any(torch.stack(flags))

    def _host_apply(self, batch: _stats.Batch, stats: GradStats, amp_scale: Tensor | None,
                    amp_inf: Tensor | None) -> None:
        """Decides on the host and applies the decision by branching (CPU)."""
        host_stats = GradStats(*(_host(v) for v in stats))
        with np.errstate(all="ignore"):
            decision, new_state = safeopt.decide(_host_namespace(), self._policy,
                                                 self._safe_state, host_stats)
        if amp_inf is not None and bool(np.any(_host(amp_inf) > 0)):
            return  # an AMP overflow is the scaler's, not a safeopt skip: nothing changes
        self._safe_state = new_state
        if not decision.skip:
            if bool(decision.clipped) and self._global_clip():
                self._apply(batch, torch.tensor(decision.scale), torch.tensor(decision.inv_scale),
                            amp_scale)
            else:  # nothing to scale: the fused kernel gets no grad_scale to write back
                self._apply(batch, None, None, amp_scale)
        safeopt.raise_if_diverged(self._policy,
                                  {"consecutive_skips": int(new_state.consecutive_skips)}, self)

    def _fused_apply(self, decision: Any, new_state: PolicyState, amp_scale: Tensor | None,
                     amp_inf: Tensor | None) -> None:
        """Hands scale and skip to the fused kernel: no host synchronisation."""
        # A policy that can never skip hands the kernel no found_inf (saves its step rollback).
        found_inf = decision.found_inf if self._can_skip() else None
        if amp_inf is not None:
            amp = torch.clamp(amp_inf.to(decision.found_inf), max=1.0)
            found_inf = amp if found_inf is None else torch.maximum(found_inf, amp)
        self._run_inner(self._grad_scale(self._clip_inverse(decision), amp_scale), found_inf)
        self._safe_state = new_state
        streak = self._watch.push(new_state.consecutive_skips)
        if streak is not None:
            safeopt.raise_if_diverged(self._policy, {"consecutive_skips": streak}, self)

    def _sync_apply(self, batch: _stats.Batch, decision: Any, new_state: PolicyState,
                    amp_scale: Tensor | None, amp_inf: Tensor | None) -> None:
        """Reads skip, streak and clip flag in one transfer; skips by not stepping.

        A policy that can never skip reads nothing: the global clip multiply
        then runs unconditionally, as in ``clip_grad_norm_``.
        """
        self._safe_state = new_state
        if not self._can_skip() and amp_inf is None:
            self._apply(batch, self._clip_factor(decision), self._clip_inverse(decision),
                        amp_scale)
            return
        overflow = torch.zeros((), dtype=torch.int32, device=self._device) if amp_inf is None \
            else (amp_inf.to(self._device) > 0).to(torch.int32)
        flags = torch.stack([decision.skip.to(torch.int32), new_state.consecutive_skips,
                             decision.clipped.to(torch.int32), overflow]).tolist()
        skip, streak, clipped, amp_overflow = (int(v) for v in flags)
        if not (skip or amp_overflow):
            scale = self._clip_factor(decision) if clipped else None
            self._apply(batch, scale, self._clip_inverse(decision), amp_scale)
        safeopt.raise_if_diverged(self._policy, {"consecutive_skips": streak}, self)

    def _apply(self, batch: _stats.Batch, scale: Tensor | None, inv_scale: Tensor | None,
               amp_scale: Tensor | None) -> None:
        """Runs the inner step with the global clip applied.

        ``scale`` multiplies the gradients (foreach path) and ``inv_scale`` is
        the fused kernel's divisor; ``None`` means no clip this step.
        """
        if self._fused:
            self._run_inner(self._grad_scale(inv_scale, amp_scale), None)
        else:
            if scale is not None:
                _stats.scale_all(batch, scale)
            self._inner.step()
        self._inner_ready = True  # the inner optimizer has created its state

    def _run_inner(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        inner = self._inner
        try:
            if grad_scale is not None:
                inner.grad_scale = grad_scale  # type: ignore[attr-defined]
            if found_inf is not None:
                inner.found_inf = found_inf  # type: ignore[attr-defined]
            inner.step()
        finally:
            inner.__dict__.pop("grad_scale", None)
            inner.__dict__.pop("found_inf", None)

    # -- helpers ----------------------------------------------------------------
    def _can_skip(self) -> bool:
        return self._policy.skip_nonfinite or self._policy.spike_skip is not None

    def _global_clip(self) -> bool:
        return self._policy.clip_norm is not None and self._policy.norm_scope == "global"

    def _clip_factor(self, decision: Any) -> Tensor | None:
        return decision.scale if self._global_clip() else None

    def _clip_inverse(self, decision: Any) -> Tensor | None:
        return decision.inv_scale if self._global_clip() else None

    def _grad_scale(self, inv_scale: Tensor | None, amp_scale: Tensor | None) -> Tensor | None:
        """The fused kernel's ``grad_scale``: the clip divisor times the AMP loss scale."""
        if amp_scale is None:
            return inv_scale
        amp = amp_scale.to(self._device, torch.float32)
        return amp if inv_scale is None else amp * inv_scale

    def _modifies_elements(self) -> bool:
        policy = self._policy
        return policy.has_penalty or policy.clip_value is not None or (
            policy.clip_norm is not None and policy.norm_scope != "global")

    def _amp_inputs(self) -> tuple[Tensor | None, Tensor | None]:
        """``grad_scale`` / ``found_inf`` that torch.amp.GradScaler set on the wrapper."""
        return self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")

    def _monitor_step(self) -> bool:
        every = self._policy.monitor_every
        return bool(every) and self._host_step % every == 0

    def _loss_tensor(self, loss: Any) -> Tensor | None:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            return loss.detach().to(self._device, torch.float32).reshape(())
        return torch.tensor(float(loss), dtype=torch.float32, device=self._device)

    def _full(self, norms: Tensor, batch: _stats.Batch) -> Tensor:
        """Per-tensor norms over all parameters (0 where a parameter has no gradient)."""
        total = self._n_tensors()
        if len(batch.index) == total:
            return norms
        index = torch.tensor(batch.index, dtype=torch.long, device=norms.device)
        return torch.zeros(total, dtype=norms.dtype, device=norms.device).index_copy_(
            0, index, norms)

    def _n_tensors(self) -> int:
        return sum(len(group["params"]) for group in self._inner.param_groups)

    def _fresh_state(self) -> PolicyState:
        """A new :class:`safeopt.PolicyState`, on the host or on the parameters' device."""
        if self._on_host:
            return safeopt.init_state(_host_namespace(), self._policy,
                                      n_tensors=self._n_tensors())
        return safeopt.init_state(_namespace(), self._policy,
                                  like=torch.empty((), device=self._device),
                                  n_tensors=self._n_tensors())

    def _state_tensors(self) -> PolicyState:
        """safeopt's state as torch tensors (copies), wherever it lives."""
        if self._on_host:
            return PolicyState(*(torch.tensor(np.asarray(v)) for v in self._safe_state))
        return PolicyState(*(v.detach().clone() for v in self._safe_state))

    def _resize_state(self) -> None:
        """Re-sizes the per-tensor fields after parameters were added (new entries start fresh)."""
        fresh = self._fresh_state()
        cat = np.concatenate if self._on_host else torch.cat
        fields = {}
        for name, old, new in zip(PolicyState._fields, self._safe_state, fresh):
            old_shape, new_shape = tuple(np.shape(old)), tuple(np.shape(new))
            if old_shape == new_shape:
                fields[name] = old
            elif len(old_shape) == 1 and len(new_shape) == 1 and old_shape[0] <= new_shape[0]:
                fields[name] = cat([old, new[old_shape[0]:]])
            else:
                fields[name] = new
        self._safe_state = PolicyState(**fields)

    def read(self) -> tuple[Policy, PolicyState, dict[str, Any]]:
        """``(policy, state as NumPy arrays, extra)`` (a host synchronisation)."""
        host = PolicyState(*(np.array(v.detach().cpu().numpy()) if isinstance(v, Tensor)
                             else np.array(v) for v in self._safe_state))
        extra = {"path": self.path, "decisions": self.decisions, "names": self.param_names(),
                 "host_step": self._host_step, "inner": type(self._inner).__name__}
        return self._policy, host, extra

    def param_names(self) -> list[str]:
        """Parameter names in tensor order: ``param_names`` when given, else ``param{i}``."""
        names: list[str] = []
        for group in self._inner.param_groups:
            given = group.get("param_names")
            for i, _ in enumerate(group["params"]):
                position = len(names)
                names.append(given[i] if given and i < len(given) else f"param{position}")
        return names


_DECIDE_ON = ("auto", "host", "device")


def _decide_on_host(decide_on: str, device: torch.device) -> bool:
    """Whether decisions are taken on the host (see the module docstring)."""
    if decide_on not in _DECIDE_ON:
        raise ValueError(f"`decide_on` must be one of {list(_DECIDE_ON)}. "
                         f"Received: decide_on={decide_on!r}")
    if decide_on == "host" and device.type != "cpu":
        raise ValueError("`decide_on='host'` needs the parameters on CPU. Received: "
                         f"decide_on='host' with parameters on {device}; use 'auto' or "
                         "'device'.")
    return decide_on == "host" or (decide_on == "auto" and device.type == "cpu")


def _has_state(inner: torch.optim.Optimizer) -> bool:
    """Whether every parameter already has its (lazily created) optimizer state."""
    return all(len(inner.state.get(p, ())) > 0
               for group in inner.param_groups for p in group["params"])


def _first_device(inner: torch.optim.Optimizer) -> torch.device:
    for group in inner.param_groups:
        for p in group["params"]:
            return _stats.local(p).device
    return torch.device("cpu")


__all__ = ["SafeOptimizer"]
