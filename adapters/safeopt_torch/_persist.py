"""How a :class:`~safeopt_torch.SafeOptimizer` is saved, loaded, copied and pickled.

* :func:`state_dict` / :func:`load_state_dict`: the inner optimizer's state
  dict with safeopt's state in every parameter group (the format, and why
  there, is :mod:`safeopt_torch._checkpoint`'s), with the state-dict hooks
  registered on the wrapper run around it, as on any ``torch.optim.Optimizer``;
* :func:`getstate` / :func:`setstate`: what ``copy.deepcopy`` and a pickle
  carry, i.e. what ``Optimizer.__getstate__`` does (the inner optimizer and
  safeopt's state; no hooks, and nothing an LR scheduler patched onto the
  instance), so that a copy steps its own parameters.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from safeopt_torch import _checkpoint, _delegate
from safeopt_torch._watch import StreakWatch

if TYPE_CHECKING:
    from safeopt_torch._optimizer import SafeOptimizer

#: The hook tables of ``torch.optim.Optimizer`` the wrapper keeps (its own, not the inner's).
HOOK_TABLES = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")

#: What a copy or a pickle of the wrapper carries (see :func:`getstate`).
PICKLED = ("_inner", "_run", "_fused", "_inner_ready", "_host_step")


def init_hooks(opt: SafeOptimizer) -> None:
    """Gives ``opt`` the hook tables it lacks (empty)."""
    for name in HOOK_TABLES:
        opt.__dict__.setdefault(name, OrderedDict())


def state_dict(opt: SafeOptimizer) -> dict[str, Any]:
    """The inner optimizer's state dict, with safeopt's entry in every parameter group."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    inner = opt.inner
    _checkpoint.mark(inner.param_groups)
    entry = _checkpoint.entry(opt._run.tensors(), opt._host_step, opt.policy)
    out = _checkpoint.attach(inner.state_dict(), entry)
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, out)
        if result is not None:
            out = result
    return out


def load_state_dict(opt: SafeOptimizer, state_dict: dict[str, Any]) -> None:
    """Loads what :func:`state_dict` made (or a plain inner state dict, or an older format)."""
    state_dict = dict(state_dict)
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    inner_dict, saved = _checkpoint.detach(state_dict)
    inner = opt.inner
    inner.load_state_dict(inner_dict)
    _checkpoint.mark(inner.param_groups)
    opt._inner_ready = _delegate.has_state(inner)
    opt._fused = _delegate.fused_capable(inner)  # an older state dict may drop `fused`
    if saved is not None:
        opt._run.load(dict(saved["state"]))
        opt._host_step = int(saved.get("host_step", 0))
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def getstate(opt: SafeOptimizer) -> dict[str, Any]:
    """The inner optimizer and safeopt's state; hooks and an LR scheduler's patch stay."""
    state = {name: opt.__dict__[name] for name in PICKLED}
    run = copy.copy(opt._run)
    run.watch = StreakWatch(run.watch.lag)  # pending device reads stay with the original
    state["_run"] = run
    return state


def setstate(opt: SafeOptimizer, state: dict[str, Any]) -> None:
    """Restores :func:`getstate`'s dict (or an older release's) and re-patches the step."""
    pending = state.pop("_pending_loss", None)  # where earlier versions kept it
    opt.__dict__.update(state)
    opt._run.owner = opt
    opt._run.__dict__.setdefault("pending_loss", pending)
    init_hooks(opt)
    opt._patch_step_function()
