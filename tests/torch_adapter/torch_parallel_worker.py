"""Jobs of the multi-process tests with the model split over processes, and their reference.

* :func:`pipeline` (2 processes): two pipeline stages, plain tensors.
* :func:`tp_fsdp` (4 processes): FSDP2 x tensor parallel on a 2x2 mesh
  ``("dp", "tp")``: column-wise then row-wise ``Linear`` (2-D DTensors),
  then a ``LayerNorm`` and a ``Linear`` sharded over ``dp`` only (1-D).
* :func:`pp_fsdp` (4 processes): two pipeline stages, each FSDP2-sharded
  over 2 ranks, on a 2x2 mesh ``("pp", "dp")``.

The stages exchange activations with ``send``/``recv`` (a one-batch
pipeline schedule). One rank writes a NaN into its own part of a gradient
at step :data:`POISONED`; the loss is passed on the last stage only.
:func:`reference` trains the same model in one process on the same data.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch_dist_worker import full, shard
from torch_helpers import batches

import safeopt
import safeopt.adapter as sa
from safeopt_torch import SafeOptimizer

STEPS, POISONED = 5, 2
SPLIT = 3  # layers [0, SPLIT) on stage 0, the rest on stage 1
KEYS = ("steps", "skips", "nonfinite", "norm_clips", "value_clips", "last_norm", "last_scale",
        "threshold", "last_loss")

#: ``(name, fused, policy, decide_on)`` per job.
CONFIGS: dict[str, tuple[tuple[str, bool, dict[str, Any], str], ...]] = {
    "pipeline": (
        ("fused", True, {"clip_norm": 1.0}, "auto"),
        ("foreach-value-device", False,
         {"clip_value": 0.05, "clip_norm": 1.0, "monitor_every": 1}, "device"),
        ("per-tensor", True, {"clip_norm": 0.5, "norm_scope": "per_tensor"}, "auto"),
    ),
    "tp_fsdp": (
        ("fused", True, {"clip_norm": 1.0}, "auto"),
        ("foreach-value-device", False,
         {"clip_value": 0.05, "clip_norm": 1.0, "monitor_every": 1}, "device"),
    ),
    "pp_fsdp": (
        ("fused-monitor", True, {"clip_norm": 1.0, "monitor_every": 1}, "auto"),
        ("foreach-value-device", False, {"clip_value": 0.05, "clip_norm": 1.0}, "device"),
    ),
}
#: Per job: ``(rank that poisons, layer whose weight gradient it poisons)``.
POISON = {"pipeline": (0, 0), "tp_fsdp": (3, 2), "pp_fsdp": (1, 0)}
#: Per job: the number of data-parallel replicas (each sees its own batches).
REPLICAS = {"pipeline": 1, "tp_fsdp": 2, "pp_fsdp": 2}


def net(seed: int = 0) -> torch.nn.Sequential:
    """The model every job splits: Linear, Tanh, Linear, LayerNorm, Linear."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8),
                               torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))


def data(replica: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of data-parallel replica ``replica``."""
    return batches(STEPS, seed=10 + replica)


def reference(job: str, fused: bool, policy: dict[str, Any]) -> dict[str, Any]:
    """One process, the whole model, every replica's batch at once."""
    model = net()
    opt = _optimizer(model, fused, policy, "auto")
    streams = [data(r) for r in range(REPLICAS[job])]
    history = []
    for i in range(STEPS):
        x = torch.cat([s[i][0] for s in streams])
        y = torch.cat([s[i][1] for s in streams])
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i == POISONED:
            model[POISON[job][1]].weight.grad.view(-1)[0] = math.nan
        opt.step(loss=loss.detach())
        history.append(_stats(opt))
    return {"history": history, "params": [p.detach().clone() for p in model.parameters()]}


def pipeline(rank: int, out_dir: str) -> dict[str, Any]:
    """Two stages over the 2 processes; the group given as a 1-D DeviceMesh or a ProcessGroup."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    out = {}
    for n, (name, fused, policy, decide_on) in enumerate(CONFIGS["pipeline"]):
        stage = _stage(net(), rank)
        group = mesh if n % 2 == 0 else mesh.get_group()
        opt = _optimizer(stage, fused, policy, decide_on, group)
        out[name] = _train("pipeline", rank, stage, opt, stage_index=rank, peer=1 - rank,
                           replica=0, replica_group=None)
        out[name]["first_param"] = 0 if rank == 0 else _n_params(net()[:SPLIT])
        out[name]["copy_shares_group"] = copy.deepcopy(opt).pipeline_group is opt.pipeline_group
    return out


def tp_fsdp(rank: int, out_dir: str) -> dict[str, Any]:
    """FSDP2 over ``dp`` x tensor parallel over ``tp`` (2x2), one stage."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = {}
    for name, fused, policy, decide_on in CONFIGS["tp_fsdp"]:
        model = net()
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        shard(model, mesh["dp"])
        opt = _optimizer(model, fused, policy, decide_on)
        out[name] = _train("tp_fsdp", rank, model, opt, stage_index=None, peer=None,
                           replica=rank // 2, replica_group=dist.group.WORLD)
        out[name]["first_param"] = 0
    return out


def pp_fsdp(rank: int, out_dir: str) -> dict[str, Any]:
    """Two stages (``pp``), each FSDP2-sharded over ``dp`` (2x2)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    index = rank // 2
    out = {}
    for name, fused, policy, decide_on in CONFIGS["pp_fsdp"]:
        stage = shard(_stage(net(), index), mesh["dp"])
        opt = _optimizer(stage, fused, policy, decide_on, mesh["pp"])
        out[name] = _train("pp_fsdp", rank, stage, opt, stage_index=index,
                           peer=rank + 2 if index == 0 else rank - 2, replica=rank % 2,
                           replica_group=mesh["dp"].get_group())
        out[name]["first_param"] = 0 if index == 0 else _n_params(net()[:SPLIT])
    return out


def _stage(model: torch.nn.Sequential, index: int) -> torch.nn.Sequential:
    return model[:SPLIT] if index == 0 else model[SPLIT:]


def _n_params(module: torch.nn.Module) -> int:
    return len(list(module.parameters()))


def _optimizer(model: torch.nn.Module, fused: bool, policy: dict[str, Any], decide_on: str,
               group: Any = None) -> SafeOptimizer:
    kw = {"fused": True} if fused else {"foreach": True}
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    return SafeOptimizer(inner, safeopt.Policy(**policy), decide_on=decide_on,
                         pipeline_group=group)


def _train(job: str, rank: int, model: torch.nn.Module, opt: SafeOptimizer,
           stage_index: int | None, peer: int | None, replica: int,
           replica_group: Any) -> dict[str, Any]:
    """Trains :data:`STEPS` steps; returns the stats after each and the final parameters."""
    stream = data(replica)
    history = []
    for i, (x, y) in enumerate(stream):
        opt.zero_grad()
        loss = _forward_backward(model, x, y, stage_index, peer)
        if i == POISONED and rank == POISON[job][0]:
            layer = POISON[job][1] if stage_index in (None, 0) else POISON[job][1] - SPLIT
            grad = model[layer].weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = math.nan
        if loss is not None and replica_group is not None:  # the mean over the replicas
            loss = loss.clone()
            dist.all_reduce(loss, group=replica_group)
            loss = loss / dist.get_world_size(replica_group)
        opt.step(loss=loss)
        history.append(_stats(opt))
    return {"history": history, "params": [full(p).detach().clone() for p in model.parameters()]}


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      stage_index: int | None, peer: int | None) -> torch.Tensor | None:
    """The loss (on the last stage), after the backward pass of every stage."""
    if stage_index is None:  # the whole model
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss.detach()
    assert peer is not None
    if stage_index == 0:
        h = model(x)
        dist.send(h.detach().contiguous(), peer)
        grad = torch.empty_like(h)
        dist.recv(grad, peer)
        h.backward(grad)
        return None
    h = torch.empty(x.shape[0], 8)
    dist.recv(h, peer)
    h.requires_grad_()
    loss = torch.nn.functional.mse_loss(model(h), y)
    loss.backward()
    assert h.grad is not None
    dist.send(h.grad.contiguous(), peer)
    return loss.detach()


def _stats(opt: SafeOptimizer) -> dict[str, Any]:
    stats = safeopt.stats(opt)
    _, state, _ = sa.read_state(opt)
    return {**{key: stats[key] for key in KEYS},
            "last_weight_norm": float(state.counters.last_weight_norm)}


def refusals(rank: int, out_dir: str) -> dict[str, str]:
    """The errors of layouts safeopt refuses (2 processes), by case."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    out = {}
    for case, placements in (("replicated gradient", [Replicate()]), ("partial", [Partial()])):
        weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
        opt = SafeOptimizer(torch.optim.SGD([weight], lr=0.1), safeopt.Policy())
        weight.grad = DTensor.from_local(torch.ones(4, 4), mesh, placements)
        try:
            opt.step()
            out[case] = "no error"
        except NotImplementedError as err:
            out[case] = str(err)
    try:
        SafeOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                      safeopt.Policy(), pipeline_group=init_device_mesh("cpu", (2, 1)))
        out["2-D mesh"] = "no error"
    except ValueError as err:
        out["2-D mesh"] = str(err)
    return out
