"""Worker of the multi-process tests, and the DDP / FSDP2 job.

``conftest.py`` spawns the ranks once per process count (spawning is slow);
each rank runs the jobs of :data:`JOBS` for its count in one process group
and saves what each returns for the tests to read (:func:`load`).
"""

from __future__ import annotations

import datetime
import importlib
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch_helpers import batches, model

import safeopt

#: ``module:function`` jobs, by number of processes; each is called as ``job(rank, out_dir)``.
JOBS = {
    2: ("torch_dist_worker:ddp_fsdp", "torch_dist_worker:loss_on_one_rank",
        "torch_dcp_worker:dcp_job", "torch_parallel_worker:pipeline",
        "torch_parallel_worker:refusals"),
    4: ("torch_parallel_worker:tp_fsdp", "torch_parallel_worker:pp_fsdp"),
}

STEPS = 4
POISONED_STEP = 2

CONFIGS = (("ddp", True), ("ddp", False), ("fsdp", True), ("fsdp", False))


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    """Runs every job for ``world`` processes in one process group."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        for job in JOBS[world]:
            module, name = job.split(":")
            result = getattr(importlib.import_module(module), name)(rank, out_dir)
            torch.save(result, os.path.join(out_dir, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def load(out_dir: Path, name: str, world: int) -> list[Any]:
    """What job ``name`` returned on each rank."""
    return [torch.load(out_dir / f"{name}-rank{r}.pt", weights_only=False) for r in range(world)]


def ddp_fsdp(rank: int, out_dir: str) -> dict[str, Any]:
    """Every config of :data:`CONFIGS`, by ``f"{mode}-{fused}"``."""
    return {f"{mode}-{fused}": train(rank, mode, fused) for mode, fused in CONFIGS}


def train(rank: int, mode: str, fused: bool) -> dict[str, Any]:
    """Trains a few steps in ``mode`` ("ddp" or "fsdp"); rank 1 sees a NaN batch."""
    torch.manual_seed(0)
    net = _parallel(model(), mode)
    kw = {"fused": True} if fused else {"foreach": True}
    opt = safeopt.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2, **kw),
                       {"clip_norm": 1.0})
    norms = []
    for i, (x, y) in enumerate(batches(STEPS, seed=10 + rank)):
        if i == POISONED_STEP and rank == 1:
            x = x.clone()
            x[0, 0] = math.nan
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        norms.append(_total_norm(net))
        opt.step()
    return {
        "stats": safeopt.stats(opt),
        "norms": norms,
        "params": [full(p).detach().clone() for p in net.parameters()],
    }


def loss_on_one_rank(rank: int, out_dir: str) -> dict[str, Any]:
    """DDP with the loss handed to ``step``: rank 1's loss is NaN at :data:`POISONED_STEP`.

    The gradients are finite everywhere (DDP averages them); only one rank's
    loss says the step is bad, so the ranks agree only if they share the loss.
    """
    torch.manual_seed(0)
    net = _parallel(model(), "ddp")
    opt = safeopt.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                       {"clip_norm": 1.0})
    losses = []
    for i, (x, y) in enumerate(batches(STEPS, seed=10 + rank)):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        given = loss.detach() * math.nan if i == POISONED_STEP and rank == 1 else loss.detach()
        losses.append(float(given))
        opt.step(loss=given)
    return {"stats": safeopt.stats(opt), "losses": losses,
            "params": [p.detach().clone() for p in net.parameters()]}


def _parallel(net: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net)
    from torch.distributed.device_mesh import init_device_mesh

    return shard(net, init_device_mesh("cpu", (dist.get_world_size(),)))


def shard(net: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """``fully_shard`` on each layer that has parameters, then on ``net``."""
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor, else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _total_norm(net: torch.nn.Module) -> float:
    """The global gradient norm as torch computes it (DTensor: over all shards)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
    return float(full(norm))
