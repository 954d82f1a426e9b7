"""What :class:`~safeopt_torch.SafeOptimizer` needs to know about (and do to) the inner optimizer.

* :func:`fused_capable`, :func:`has_state`, :func:`first_device`,
  :func:`decide_on_host`: which execution path the inner optimizer allows,
  where its parameters live, and so where decisions are taken;
* :func:`step_kind`: whether its ``step`` takes a closure, requires one
  (``LBFGS``), and may evaluate it more than once;
* :func:`run_step`: runs its ``step`` as ``Optimizer.profile_hook_step``
  does, with the inner optimizer's own step hooks and profiler range, but
  without the global hooks (``register_optimizer_step_pre_hook``): the
  wrapper's own ``step`` fires those, once per wrapped step;
* :func:`kernel_inputs`, :func:`raw_step`: the fused kernel's inputs set on
  it, and its step without wrappers (traced under ``torch.compile``);
* :func:`snapshot` / :func:`restore`: parameters and per-parameter state
  copied and put back, so that a step abandoned half-way (a closure
  re-evaluation that went non-finite) never happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from safeopt_torch import _batch


def fused_capable(inner: torch.optim.Optimizer) -> bool:
    """Whether ``inner``'s step reads ``grad_scale`` / ``found_inf`` attributes."""
    if not getattr(inner, "_step_supports_amp_scaling", False):
        return False
    if not all(group.get("fused") for group in inner.param_groups):
        return False
    return "grad_scaler" not in inspect.signature(inner.step).parameters


def has_state(inner: torch.optim.Optimizer) -> bool:
    """Whether every parameter already has its (lazily created) optimizer state."""
    return all(len(inner.state.get(p, ())) > 0
               for group in inner.param_groups for p in group["params"])


def first_device(inner: torch.optim.Optimizer) -> torch.device:
    """The device of the first parameter (CPU when there is none)."""
    for group in inner.param_groups:
        for p in group["params"]:
            return _batch.local(p).device
    return torch.device("cpu")


#: Where ``SafeOptimizer(..., decide_on=...)`` takes its decisions.
DECIDE_ON = ("auto", "host", "device")


def decide_on_host(decide_on: str, device: torch.device) -> bool:
    """Whether decisions are taken on the host (see :mod:`safeopt_torch._optimizer`)."""
    if decide_on not in DECIDE_ON:
        raise ValueError(f"`decide_on` must be one of {list(DECIDE_ON)}. "
                         f"Received: decide_on={decide_on!r}")
    if decide_on == "host" and device.type != "cpu":
        raise ValueError("`decide_on='host'` needs the parameters on CPU. Received: "
                         f"decide_on='host' with parameters on {device}; use 'auto' or "
                         "'device'.")
    return decide_on == "host" or (decide_on == "auto" and device.type == "cpu")


class StepKind(NamedTuple):
    """How an optimizer class's ``step`` uses a closure.

    Attributes:
      accepts_closure: ``step`` has a ``closure`` parameter.
      requires_closure: ... without a default (``LBFGS``).
      reevaluates: It may call the closure more than once in a step:
        it requires one, or it is not one of ``torch.optim``'s own (which
        call an optional closure once, first).
    """

    accepts_closure: bool
    requires_closure: bool
    reevaluates: bool


_KINDS: dict[type[torch.optim.Optimizer], StepKind] = {}


def step_kind(cls: type[torch.optim.Optimizer]) -> StepKind:
    """The :class:`StepKind` of ``cls.step`` (read once per class)."""
    kind = _KINDS.get(cls)
    if kind is None:
        step = unhooked(cls.step)
        parameter = inspect.signature(step).parameters.get("closure")
        requires = parameter is not None and parameter.default is inspect.Parameter.empty
        own = inspect.unwrap(step).__module__.startswith("torch.optim.")
        kind = _KINDS[cls] = StepKind(parameter is not None, requires,
                                      requires or (parameter is not None and not own))
    return kind


def unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` without ``Optimizer.profile_hook_step``'s wrapper (the hooks), if it has one."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step  # type: ignore[attr-defined]


def run_step(inner: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """Runs ``inner.step`` with its own step hooks but not the global ones.

    What ``Optimizer.profile_hook_step`` does, less the global pre and post
    hooks: the profiler range ``Optimizer.step#<class>.step``, the inner
    optimizer's pre hooks (which may replace the arguments), the step, and
    its post hooks.
    """
    args: tuple[Any, ...] = (inner,) if closure is None else (inner, closure)
    kwargs: dict[str, Any] = {}
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(inner).__name__}.step"):
        for pre_hook in inner._optimizer_step_pre_hooks.values():
            result = pre_hook(inner, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{inner.step} must return None or a tuple of "
                                       f"(new_args, new_kwargs), but got {result}.")
                args, kwargs = result
        out = unhooked(type(inner).step)(*args, **kwargs)
        inner._optimizer_step_code()
        for post_hook in inner._optimizer_step_post_hooks.values():
            post_hook(inner, args, kwargs)
    return out


@contextlib.contextmanager
def kernel_inputs(inner: torch.optim.Optimizer, grad_scale: Tensor | None,
                  found_inf: Tensor | None) -> Iterator[None]:
    """Sets ``inner.grad_scale`` / ``inner.found_inf`` (when given) meanwhile.

    The fused optimizers read them as ``GradScaler`` sets them.
    """
    if grad_scale is not None:
        inner.grad_scale = grad_scale  # type: ignore[attr-defined]
    if found_inf is not None:
        inner.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        yield
    finally:
        inner.__dict__.pop("grad_scale", None)
        inner.__dict__.pop("found_inf", None)


def raw_step(inner: torch.optim.Optimizer, grad_scale: Tensor | None,
             found_inf: Tensor | None) -> None:
    """The inner step without its hook and ``no_grad`` wrappers (they break graphs)."""
    raw = inspect.unwrap(type(inner).step)
    if grad_scale is not None:
        inner.grad_scale = grad_scale  # type: ignore[attr-defined]
    if found_inf is not None:
        inner.found_inf = found_inf  # type: ignore[attr-defined]
    raw(inner)
    inner.__dict__.pop("grad_scale", None)
    inner.__dict__.pop("found_inf", None)


def param_names(inner: torch.optim.Optimizer) -> list[str]:
    """Parameter names in tensor order: ``param_names`` when given, else ``param{i}``."""
    names: list[str] = []
    for group in inner.param_groups:
        given = group.get("param_names")
        for i, _ in enumerate(group["params"]):
            position = len(names)
            names.append(given[i] if given and i < len(given) else f"param{position}")
    return names


@dataclasses.dataclass
class Snapshot:
    """Copies of the parameters and of the per-parameter state of an optimizer."""

    params: list[tuple[Tensor, Tensor]]
    state: dict[Any, Any]


def snapshot(inner: torch.optim.Optimizer) -> Snapshot:
    """Copies ``inner``'s parameters and state (one copy of each tensor)."""
    params = [(p, p.detach().clone()) for group in inner.param_groups for p in group["params"]]
    return Snapshot(params, {key: _clone(value) for key, value in inner.state.items()})


def restore(inner: torch.optim.Optimizer, saved: Snapshot) -> None:
    """Puts ``saved`` back: parameters in place, the state dict's contents replaced."""
    with torch.no_grad():
        for p, copy in saved.params:
            p.copy_(copy)
    inner.state.clear()
    inner.state.update(saved.state)


def _clone(value: Any) -> Any:
    """A copy of ``value``'s tensors, through dicts, lists and tuples (the rest shared)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if type(value) is tuple:
        return tuple(_clone(v) for v in value)
    return value
