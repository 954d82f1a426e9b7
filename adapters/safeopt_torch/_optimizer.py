"""``SafeOptimizer``: a ``torch.optim.Optimizer`` that protects another one.

Every step runs the core's pipeline (gather, decide, apply; see
:mod:`safeopt_torch._runner`) with torch's foreach kernels and applies the
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
``grad_scale``). Sparse gradients are refused. Complex parameters are
measured by their modulus (see :mod:`safeopt_torch._kernels`).

``opt.step(closure)`` evaluates the closure once and decides on its
gradients like any step; the inner optimizer gets a replay whose first call
returns that loss, so an optimizer that evaluates its closure once sees what
a bare one would. ``LBFGS`` (or any optimizer that evaluates it again)
then gets the policy applied to the gradients of each evaluation, as if it
ran inside the closure, with this step's thresholds (safeopt's state
advances once per step). A non-finite first evaluation skips the step; a
non-finite later one abandons it: parameters and the inner state are put
back, and it counts as a skip (:mod:`safeopt_torch._closure`).

The wrapper's ``step`` fires the global step hooks
(``register_optimizer_step_pre_hook``) and its own, once; the inner step runs
with the inner optimizer's own hooks, not the global ones again. A
``copy.deepcopy`` or a pickle carries what ``Optimizer.__getstate__`` does
(the inner optimizer and safeopt's state; no hooks, and nothing an LR
scheduler patched onto the instance), so a copy steps its own parameters.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063 (norm clipping).
  Brock, De, Smith & Simonyan (2021), High-Performance Large-Scale Image
  Recognition Without Normalization. https://arxiv.org/abs/2102.06171 (AGC).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch import _delegate
from safeopt_torch._closure import Abort, Replay, abandon
from safeopt_torch._runner import Runner, _can_skip
from safeopt_torch._watch import HostWatch

_HOOK_TABLES = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")

#: What a copy or a pickle of the wrapper carries (see ``__getstate__``).
_PICKLED = ("_inner", "_run", "_fused", "_inner_ready", "_host_step")


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
        for name in _HOOK_TABLES:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._fused = _delegate.fused_capable(inner)
        self._inner_ready = _delegate.has_state(inner)
        self._host_step = 0
        device = _delegate.first_device(inner)
        self._run = Runner(inner, policy, _delegate.decide_on_host(decide_on, device), device)

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
        return self._run.policy

    @property
    def path(self) -> str:
        """``"fused"`` or ``"foreach"`` (see the module docstring)."""
        return "fused" if self._fused else "foreach"

    @property
    def decisions(self) -> str:
        """``"host"`` or ``"device"``: where the decision is taken (see the module docstring)."""
        return "host" if self._run.on_host else "device"

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
                f"policy={self.policy!r},\n{self._inner!r})")

    def __getstate__(self) -> dict[str, Any]:
        """The inner optimizer and safeopt's state; hooks and an LR scheduler's patch stay."""
        state = {name: self.__dict__[name] for name in _PICKLED}
        run = copy.copy(self._run)
        run.watch = HostWatch()  # a pending device read stays with the original
        state["_run"] = run
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in _HOOK_TABLES:
            self.__dict__.setdefault(name, OrderedDict())
        self._patch_step_function()

    # -- optimizer API ----------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients (the inner optimizer's ``zero_grad``)."""
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group to the inner optimizer; safeopt's per-tensor state grows."""
        self._inner.add_param_group(param_group)
        self._fused = _delegate.fused_capable(self._inner)
        self._inner_ready = False
        self._run.resize()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus safeopt's state under ``"safeopt"``."""
        out = self._inner.state_dict()
        out["safeopt"] = {"state": self._run.tensors(), "host_step": self._host_step,
                          "policy": self.policy.to_dict()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` returned (a plain inner state dict works too).

        State dicts written by safeopt 0.1 load too.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop("safeopt", None)
        self._inner.load_state_dict(state_dict)
        self._inner_ready = _delegate.has_state(self._inner)
        self._fused = _delegate.fused_capable(self._inner)  # an older state dict may drop `fused`
        if saved is None:
            return
        self._run.load(dict(saved["state"]))
        self._host_step = int(saved.get("host_step", 0))

    @torch.compiler.disable(recursive=True)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             loss: Any = None) -> Any:
        """Performs one protected optimisation step (closures: see the module docstring).

        Args:
          closure: Re-evaluates the model and returns the loss; required
            when the inner optimizer's ``step`` requires one (``LBFGS``).
          loss: This step's loss (a tensor or a number), for policies that
            read it (non-finite loss skips, ``spike_skip="loss"``); the
            closure's loss is used when it is not given.

        Returns:
          The closure's loss (its first evaluation), if a closure was given.

        Raises:
          TypeError: The inner optimizer requires a closure and none was
            given (the inner optimizer's own message).
          safeopt.DivergenceError: ``max_consecutive_skips`` steps in a row
            were skipped (on the fused path on an accelerator, possibly one
            step later).
        """
        kind = _delegate.step_kind(type(self._inner))
        if closure is None and kind.requires_closure:
            _delegate.unhooked(type(self._inner).step)(self._inner)  # raises the inner's TypeError
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        policy = self.policy
        waited = self._run.watch.poll()
        if waited is not None:
            sa.raise_if_diverged(policy, {"consecutive_skips": waited}, self)
        given = loss if loss is not None else closure_loss
        amp_scale, amp_inf = self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")
        before = self._run.state
        replay = None if closure is None or not kind.accepts_closure else Replay(
            closure, closure_loss, self._run, before, kind.reevaluates and _can_skip(policy))
        try:
            streak = self._run.step(lambda scale, inf: self._inner_step(scale, inf, replay),
                                    self._fused, self._inner_ready, given, amp_scale, amp_inf)
        except Abort as abort:
            streak = abandon(self._run, before, abort.stats)
        self._host_step += 1
        if policy.log_every:  # one host read every log_every steps, else nothing
            sa.after_step(self, self._host_step, policy, check=False)
        if streak is not None and policy.max_consecutive_skips is not None \
                and streak >= policy.max_consecutive_skips:
            sa.raise_if_diverged(policy, sa.summarize(policy, self._run.host_state()), self)
        return closure_loss

    def _inner_step(self, grad_scale: Tensor | None, found_inf: Tensor | None,
                    replay: Replay | None) -> None:
        """Runs the inner step (the fused kernel's inputs when given); undoes an abandoned one."""
        inner = self._inner
        saved = _delegate.snapshot(inner) if replay is not None and replay.may_abort else None
        try:
            if grad_scale is not None:
                inner.grad_scale = grad_scale  # type: ignore[attr-defined]
            if found_inf is not None:
                inner.found_inf = found_inf  # type: ignore[attr-defined]
            _delegate.run_step(inner, replay)
        except Abort:
            if saved is not None:
                _delegate.restore(inner, saved)
            raise
        finally:
            inner.__dict__.pop("grad_scale", None)
            inner.__dict__.pop("found_inf", None)
        self._inner_ready = True  # the inner optimizer has created its state

    # -- reading ---------------------------------------------------------------------
    def read(self) -> tuple[Policy, sa.State, dict[str, Any]]:
        """``(policy, state as NumPy arrays, extra)`` (a host synchronisation)."""
        extra = {"path": self.path, "decisions": self.decisions, "names": self.param_names(),
                 "host_step": self._host_step, "inner": type(self._inner).__name__}
        return self.policy, self._run.host_state(), extra

    def param_names(self) -> list[str]:
        """Parameter names in tensor order: ``param_names`` when given, else ``param{i}``."""
        names: list[str] = []
        for group in self._inner.param_groups:
            given = group.get("param_names")
            for i, _ in enumerate(group["params"]):
                position = len(names)
                names.append(given[i] if given and i < len(given) else f"param{position}")
        return names


__all__ = ["SafeOptimizer"]
