"""safeopt's state in a torch optimizer state dict, where DCP keeps it.

:meth:`SafeOptimizer.state_dict <safeopt_torch.SafeOptimizer.state_dict>`
returns the inner optimizer's state dict with one more key in every entry
of ``"param_groups"``::

    {"state": {...}, "param_groups": [{"lr": ..., "params": [...],
        "safeopt": {"state": {"counters.steps": tensor, ...},   # every field
                    "host_step": int, "policy": "{...}"}}, ...]}

(the same ``"safeopt"`` dict in every group; the policy as JSON text, one
item for DCP instead of one per setting). That is where
``torch.distributed.checkpoint`` keeps it: ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` (the FSDP2 checkpoint path) copy only
``"state"`` (per parameter, keyed by its name) and ``"param_groups"``,
and with ``flatten_optimizer_state_dict=True`` (torchtitan) a group's keys
are stored once per parameter of the group (``param_groups.<name>.safeopt``)
and read back only for the keys the live groups have. So the live
``param_groups`` carry ``"safeopt": None`` (a marker: the state itself lives
with the wrapper and fills the key in when a state dict is made). The
per-parameter ``"state"`` would not do: optimizers create a parameter's
state when it is empty, and DCP creates an optimizer's state only when
none exists.

Older state dicts, with safeopt's state in a top-level ``"safeopt"`` entry
(safeopt 0.1, whose fields the core upgrades, and the releases before
this format), load too.

DCP creates the state of an optimizer that has none by a step with every
gradient zero and every learning rate 0 (``_init_optim_state``).
:func:`is_state_init` recognises that caller, and the wrapper hands such a
step to the inner optimizer without counting it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from safeopt import Policy

#: The key of safeopt's state in each entry of ``param_groups``.
KEY = "safeopt"


def mark(param_groups: list[dict[str, Any]]) -> None:
    """Gives every live parameter group the key (``None``), for DCP's flattened loads."""
    for group in param_groups:
        group.setdefault(KEY, None)


def entry(tensors: dict[str, Tensor], host_step: int, policy: Policy) -> dict[str, Any]:
    """safeopt's entry: its state, the wrapper's step count and the policy (JSON text)."""
    return {"state": tensors, "host_step": host_step, "policy": json.dumps(policy.to_dict())}


def attach(state_dict: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (not changed) with ``value`` under the key of every parameter group."""
    out = dict(state_dict)
    out["param_groups"] = [{**group, KEY: value} for group in state_dict["param_groups"]]
    return out


def detach(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
    """``(the inner optimizer's state dict, safeopt's entry or None)`` (``state_dict`` unchanged).

    The entry is the first one found in the parameter groups, else a
    top-level one (older formats); the groups handed on carry the marker.
    """
    inner = dict(state_dict)
    top = inner.pop(KEY, None)
    groups = inner.get("param_groups")
    if not isinstance(groups, list):
        return inner, top
    found = [group.get(KEY) for group in groups if isinstance(group, Mapping)]
    inner["param_groups"] = [{**group, KEY: None} if isinstance(group, Mapping) else group
                             for group in groups]
    saved = next((e for e in found if e is not None), top)
    if saved is not None and not (isinstance(saved, Mapping) and "state" in saved):
        raise ValueError(
            f"The `{KEY}` entry of an optimizer state dict must be a dict with a 'state' key, "
            f"as SafeOptimizer.state_dict() writes it. Received: {KEY}={saved!r}")
    return inner, saved


def is_state_init(inner: torch.optim.Optimizer) -> bool:
    """Whether this step only creates the optimizer's state: DCP's ``_init_optim_state``.

    That is a step called from ``torch.distributed.checkpoint``'s
    ``_init_optim_state`` (every rank calls it alike), on an optimizer with no
    state yet and every learning rate 0. Such a step changes no parameter;
    it is not a step of the training run. A user's own first step with a
    learning rate of 0 is counted as usual.
    """
    if inner.state or not all(_is_zero(group.get("lr", 0.0)) for group in inner.param_groups):
        return False
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_FRAMES):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and \
                frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


#: How many callers up :func:`is_state_init` looks for DCP's ``_init_optim_state``.
_FRAMES = 8


def _is_zero(lr: Any) -> bool:
    return bool(lr == 0) if not isinstance(lr, torch.Tensor) else bool((lr == 0).all())
