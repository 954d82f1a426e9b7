"""``SafeOptimizer``: a ``torch.optim.Optimizer`` that protects another one.

Every step runs the core's pipeline (gather, decide, apply) with torch's
foreach kernels (:mod:`safeopt_torch._runner`) and applies the decision on
the ``"fused"`` path (an inner ``Adam``, ``AdamW`` or ``SGD`` with
``fused=True``, ``Adagrad`` with ``fused=True`` on CPU: the kernel gets the
clip scale as ``grad_scale`` and the skip flag as ``found_inf``, and the
step never waits for the device) or the ``"foreach"`` path (any other
optimizer: one host read per step, and a skipped step does not call the
inner ``step``), reported by ``safeopt.stats(opt)["path"]``. The decision is
taken on the host on CPU (``"host"``: NumPy scalars, applied by branching)
and on the device elsewhere (``"device"``), reported by
``safeopt.stats(opt)["decisions"]``; ``SafeOptimizer(inner, policy,
decide_on="device")`` forces the device on CPU. A policy that can never skip
(``skip_nonfinite=False``, no ``spike_skip``) reads nothing from the device
on either path. :mod:`safeopt_torch._paths` describes the paths, the
divergence guard's lagged read (:mod:`safeopt_torch._watch`) and the inner
optimizer's first step (on the ``"foreach"`` path, since a kernel-level skip
cannot undo lazily created state).

Under ``torch.compile`` the protected step traces whole (``fullgraph=True``)
with device decisions (``decide_on="device"``, the default on an
accelerator): no host read, no graph break; see
:mod:`safeopt_torch._compiled`. The inner optimizer must hold its state
before the first compiled step (it creates it lazily: take one eager step,
or load a checkpoint). Telemetry and the divergence check need the host: in
a compiled loop call ``safeopt.after_step(opt, step)`` / ``safeopt.check(opt)``
every few steps, outside the compiled function, as in a jitted JAX loop.

With ``torch.amp.GradScaler`` decisions are taken on unscaled gradients,
and an AMP overflow skips the step without touching safeopt's state (the
scaler's business, not a safeopt skip); see :mod:`safeopt_torch._paths`.

Distributed: under DDP every rank takes the same decision on the averaged
gradients; under FSDP2 (alone or with tensor parallelism) each tensor's
statistics are reduced over the ranks that hold its shards, and under
pipeline parallelism over the stages (:attr:`SafeOptimizer.pipeline_group`),
so the global norm, the skip flag and the clip scale are the whole model's
on every rank (:mod:`safeopt_torch._batch`).

Checkpoints: :meth:`~SafeOptimizer.state_dict` puts safeopt's state in
every entry of ``param_groups``, where ``torch.distributed.checkpoint``
keeps it (:mod:`safeopt_torch._checkpoint`). safeopt's state is the same on
every rank (DCP saves one copy) when the ``loss`` given to ``step`` is too:
pass the mean over the ranks.

Like ``clip_grad_norm_``, the wrapper leaves the clipped gradients in
``.grad`` (the fused kernels write back the gradient they divided by
``grad_scale``). Sparse gradients are refused. Complex parameters are
measured by their modulus (see :mod:`safeopt_torch._kernels`).

``opt.step(closure)`` evaluates the closure once and decides on its
gradients like any step; an inner optimizer that evaluates it again
(``LBFGS``) gets the policy applied to each evaluation, and a non-finite
later one abandons the step (:mod:`safeopt_torch._closure`).

The wrapper's ``step`` fires the global step hooks
(``register_optimizer_step_pre_hook``) and its own, once; the inner step runs
with the inner optimizer's own hooks, not the global ones again. A
``copy.deepcopy`` or a pickle carries what ``Optimizer.__getstate__`` does
(see :mod:`safeopt_torch._persist`), so a copy steps its own parameters.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063 (norm clipping).
  Brock, De, Smith & Simonyan (2021), High-Performance Large-Scale Image
  Recognition Without Normalization. https://arxiv.org/abs/2102.06171 (AGC).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch import _checkpoint, _delegate, _persist, _stages
from safeopt_torch._closure import Abort, Replay, abandon
from safeopt_torch._paths import can_skip
from safeopt_torch._runner import Runner


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
                 decide_on: str = "auto", pipeline_group: Any = None) -> None:
        """Wraps ``inner``.

        Args:
          inner: The optimizer to protect.
          policy: The policy in force.
          decide_on: ``"auto"`` (host on CPU, device elsewhere), ``"host"``
            (CPU only) or ``"device"``; see the module docstring.
          pipeline_group: The process group over the pipeline stages, when
            ``inner`` holds one stage's parameters (see
            :attr:`pipeline_group`).
        """
        # Optimizer.__init__ would build param groups of its own: the state is
        # the inner optimizer's, so only the hook tables are set up here.
        self._inner = inner
        _persist.init_hooks(self)
        self._patch_step_function()
        self._fused = _delegate.fused_capable(inner)
        self._inner_ready = _delegate.has_state(inner)
        self._host_step = 0
        device = _delegate.first_device(inner)
        self._run = Runner(inner, policy, _delegate.decide_on_host(decide_on, device), device)
        self._run.owner = self
        self.pipeline_group = pipeline_group
        _checkpoint.mark(inner.param_groups)

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

    @property
    def pipeline_group(self) -> Any:
        """The process group over the pipeline stages (``None``: this optimizer sees the model).

        Under pipeline parallelism each stage's optimizer holds that stage's
        parameters. Set this to the group that joins the stages (one rank
        per stage; a 1-D ``DeviceMesh`` such as torchtitan's ``pp_mesh``
        works too), on every stage, before the first step::

            opt = safeopt.wrap(torch.optim.AdamW(stage.parameters(), fused=True), policy)
            opt.pipeline_group = pp_mesh  # or SafeOptimizer(..., pipeline_group=pp_mesh)

        Every step then combines the stages' statistics (the squared norms,
        the largest ``|g|``, the clip flag of a local scope, the loss) with
        one all-gather over the group, so that the global norm, the skip flag
        and the clip scale are the whole model's and every rank of every
        stage takes the same decision, as torchtitan's ``clip_grad_norm_``
        reduces the norm over ``pp_mesh``. Every stage must call ``step`` on
        every iteration, with gradients. Pass ``loss=`` on the stage(s) that compute it (the
        first stage given one provides it to all); a stage given no loss
        reads whether another was (one flag, a host read on an accelerator).
        The per-layer monitor stays per stage.
        """
        stages = self._run.stages
        return None if stages is None else stages.group

    @pipeline_group.setter
    def pipeline_group(self, value: Any) -> None:
        group = _stages.pipeline_group(value)
        self._run.stages = None if group is None else _stages.Stages(group)

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
        """The inner optimizer and safeopt's state (see :mod:`safeopt_torch._persist`)."""
        return _persist.getstate(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _persist.setstate(self, state)

    # -- optimizer API ----------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients (the inner optimizer's ``zero_grad``)."""
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group to the inner optimizer; safeopt's per-tensor state grows."""
        self._inner.add_param_group(param_group)
        _checkpoint.mark(self._inner.param_groups)
        self._fused = _delegate.fused_capable(self._inner)
        self._inner_ready = False
        self._run.resize()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with safeopt's state in every parameter group.

        Every entry of ``param_groups`` carries ``"safeopt"``: ``{"state":
        {"feature.field": tensor}, "host_step": int, "policy": JSON text}``, where
        ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``, with
        or without ``flatten_optimizer_state_dict``) keeps it; see
        :mod:`safeopt_torch._checkpoint`. The state-dict hooks registered on
        the wrapper run around it, as on any ``torch.optim.Optimizer`` (the
        inner optimizer's run inside).
        """
        return _persist.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` returned (a plain inner state dict works too).

        State dicts that hold safeopt's state in a top-level ``"safeopt"``
        entry (earlier releases, safeopt 0.1 included) load too. The
        load-state-dict hooks registered on the wrapper run around it, as
        on any ``torch.optim.Optimizer``.
        """
        _persist.load_state_dict(self, state_dict)

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
            were skipped: at that step, or, on the fused path on an
            accelerator, exactly :data:`safeopt_torch._watch.LAG` steps later
            (the step never waits for the device), on every rank alike.
        """
        kind = _delegate.step_kind(type(self._inner))
        if closure is None and kind.requires_closure:
            _delegate.unhooked(type(self._inner).step)(self._inner)  # raises the inner's TypeError
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        elif loss is None and not torch.compiler.is_compiling() and self._state_init():
            return None
        given = next((x for x in (loss, closure_loss, self._run.pending_loss) if x is not None),
                     None)
        if self._run.pending_loss is not None:  # no write when none: under torch.compile an
            self._run.pending_loss = None  # unconditional one lost the compiled step's state
        if torch.compiler.is_compiling():
            if not self._inner_ready:
                raise RuntimeError(
                    "A compiled protected step needs the inner optimizer's state, which it "
                    "creates lazily on its first step: take one step eagerly (or load a "
                    "checkpoint) before calling the compiled function. Received: an inner "
                    f"{type(self._inner).__name__} without state.")
            self._run.compiled_step(self._raw_inner_step, given)
            return closure_loss
        if self._run.mirror_stale:  # after compiled steps
            self._host_step = self._run.resync()
        policy = self.policy
        amp_scale, amp_inf = self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")
        before = self._run.state
        replay = None if closure is None or not kind.accepts_closure else Replay(
            closure, closure_loss, self._run, before, kind.reevaluates and can_skip(policy))
        try:
            streak = self._run.step(lambda scale, inf: self._inner_step(scale, inf, replay),
                                    self._fused, self._inner_ready, given, amp_scale, amp_inf)
        except Abort as abort:
            streak = abandon(self._run, before, abort.stats)
        self._host_step += 1
        if policy.log_every:  # one host read every log_every steps, else nothing
            sa.after_step(self, self._host_step, policy, check=False)
        if streak is not None:
            sa.raise_if_diverged(policy, {"consecutive_skips": streak[0],
                                          "streak_nonfinite": streak[1]}, self)
        return closure_loss

    def _raw_inner_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        _delegate.raw_step(self._inner, grad_scale, found_inf)

    def _state_init(self) -> bool:
        """Whether this is DCP's state-creating step, handed to the inner optimizer uncounted.

        See :func:`safeopt_torch._checkpoint.is_state_init`.
        """
        if not _checkpoint.is_state_init(self._inner):
            return False
        self._inner_step(None, None, None)
        return True

    def _inner_step(self, grad_scale: Tensor | None, found_inf: Tensor | None,
                    replay: Replay | None) -> None:
        """Runs the inner step (the fused kernel's inputs when given); undoes an abandoned one."""
        inner = self._inner
        saved = _delegate.snapshot(inner) if replay is not None and replay.may_abort else None
        try:
            with _delegate.kernel_inputs(inner, grad_scale, found_inf):
                _delegate.run_step(inner, replay)
        except Abort:
            if saved is not None:
                _delegate.restore(inner, saved)
            raise
        self._inner_ready = True  # the inner optimizer has created its state

    def set_loss(self, loss: Any) -> None:
        """Gives the policy the loss of the coming step, for callers of ``step()`` without it.

        Trainers call ``optimizer.step()`` without the loss (Hugging Face
        ``Trainer``); their integrations hand it here instead. A loss given
        to :meth:`step` (or returned by its closure) wins; either way it is
        used for one step.

        Kept with safeopt's state, so that a trainer's wrapper around this
        optimizer (Lightning's ``LightningOptimizer``) hands the loss on too.
        """
        self._run.pending_loss = loss

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step was skipped (on the device path, one read of the device).

        Skipped by the policy, or by an AMP overflow on the fused path (the
        ``found_inf`` ``torch.amp.GradScaler`` hands the wrapper). On the
        foreach path the scaler does not call ``step`` on an overflow, so
        the flag still describes the step before.
        """
        skip = self._run.last_skip
        return bool(skip) if skip is not None else False

    # -- reading ---------------------------------------------------------------------
    def read(self) -> tuple[Policy, sa.State, dict[str, Any]]:
        """``(policy, state as NumPy arrays, extra)`` (a host synchronisation)."""
        extra = {"path": self.path, "decisions": self.decisions, "names": self.param_names(),
                 "host_step": self._host_step, "inner": type(self._inner).__name__}
        return self.policy, self._run.host_state(), extra

    def param_names(self) -> list[str]:
        """Parameter names in tensor order: ``param_names`` when given, else ``param{i}``."""
        return _delegate.param_names(self._inner)


__all__ = ["SafeOptimizer"]
