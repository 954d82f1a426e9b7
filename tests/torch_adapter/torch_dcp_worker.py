"""The DCP job of the 2-process tests: FSDP2, saved and resumed with torch.distributed.checkpoint.

Each config trains :data:`STEPS` steps without a break, saving a checkpoint
before step :data:`SAVE_AT` (``dcp.save`` of ``get_model_state_dict`` and
``get_optimizer_state_dict``); a second model and optimizer then load it
(``dcp.load``, ``set_*_state_dict``) and train the remaining steps. Rank 1
writes a NaN into its own shard of a gradient at step :data:`POISONED`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch_dist_worker import full, shard
from torch_helpers import batches, model

import safeopt
import safeopt.adapter as sa
from safeopt_torch import SafeOptimizer

#: ``(name, fused, flatten_optimizer_state_dict, decide_on)``
CONFIGS = (
    ("fused-nested", True, False, "auto"),
    ("foreach-flat", False, True, "auto"),
    ("fused-flat-device", True, True, "device"),
)
STEPS, SAVE_AT, POISONED = 7, 4, 2
POLICY = {"clip_norm": 1.0, "monitor_every": 2}


def dcp_job(rank: int, out_dir: str) -> dict[str, Any]:
    """Every config of :data:`CONFIGS`, by name."""
    return {name: _config(rank, os.path.join(out_dir, f"ckpt-{name}"), fused, flat, decide_on)
            for name, fused, flat, decide_on in CONFIGS}


def _config(rank: int, path: str, fused: bool, flat: bool, decide_on: str) -> dict[str, Any]:
    options = StateDictOptions(flatten_optimizer_state_dict=flat)
    data = batches(STEPS, seed=10 + rank)
    net, opt = _setup(0, fused, decide_on)
    for i in range(STEPS):
        if i == SAVE_AT:
            at_save = safeopt.stats(opt)
            dcp.save({"model": get_model_state_dict(net),
                      "optim": get_optimizer_state_dict(net, opt, options=options)},
                     checkpoint_id=path)
        _step(net, opt, data[i], poison=i == POISONED and rank == 1)

    again, resumed = _setup(1, fused, decide_on)
    hooks: list[Any] = []
    resumed.register_state_dict_pre_hook(lambda o: hooks.append("state_dict_pre"))
    resumed.register_state_dict_post_hook(
        lambda o, sd: hooks.append(("state_dict_post", _has_entry(sd))))
    resumed.register_load_state_dict_pre_hook(
        lambda o, sd: hooks.append(("load_pre", _has_entry(sd))))
    resumed.register_load_state_dict_post_hook(lambda o: hooks.append("load_post"))
    before = [full(p).detach().clone() for p in again.parameters()]
    template = {"model": get_model_state_dict(again),
                "optim": get_optimizer_state_dict(again, resumed, options=options)}
    fresh = {"stats": safeopt.stats(resumed), "inner_state": len(resumed.state),
             "params": [full(p).detach().clone() for p in again.parameters()]}
    dcp.load(template, checkpoint_id=path)
    set_model_state_dict(again, template["model"])
    set_optimizer_state_dict(again, resumed, template["optim"], options=options)
    loaded = safeopt.stats(resumed)
    for i in range(SAVE_AT, STEPS):
        _step(again, resumed, data[i], poison=i == POISONED and rank == 1)
    return {"uninterrupted": _snapshot(net, opt), "resumed": _snapshot(again, resumed),
            "at_save": at_save, "loaded": loaded, "fresh": fresh, "hooks": hooks,
            "before": before}


def _setup(seed: int, fused: bool, decide_on: str) -> tuple[torch.nn.Module, SafeOptimizer]:
    net = shard(model(seed), init_device_mesh("cpu", (dist.get_world_size(),)))
    kw = {"fused": True} if fused else {"foreach": True}
    inner = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    return net, SafeOptimizer(inner, safeopt.Policy(**POLICY), decide_on=decide_on)


def _step(net: torch.nn.Module, opt: SafeOptimizer, batch: tuple[torch.Tensor, torch.Tensor],
          poison: bool) -> None:
    x, y = batch
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(net(x), y)
    loss.backward()
    if poison:  # this rank's shard only: the reduction must carry it to the other rank
        _local(net[0].weight.grad).view(-1)[0] = math.nan
    mean = loss.detach().clone()
    dist.all_reduce(mean)  # the same loss on every rank, as safeopt's state must agree
    opt.step(loss=mean / dist.get_world_size())


def _snapshot(net: torch.nn.Module, opt: SafeOptimizer) -> dict[str, Any]:
    _, state, _ = sa.read_state(opt)
    inner = {key: {name: _local(v).clone() if isinstance(v, torch.Tensor) else v
                   for name, v in entry.items()}
             for key, entry in opt.inner.state_dict()["state"].items()}
    return {"params": [full(p).detach().clone() for p in net.parameters()], "inner": inner,
            "safeopt": {k: np.array(v) for k, v in sa.flatten(state).items()},
            "stats": safeopt.stats(opt)}


def _has_entry(state_dict: dict[str, Any]) -> bool:
    return state_dict["param_groups"][0]["safeopt"] is not None


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t
