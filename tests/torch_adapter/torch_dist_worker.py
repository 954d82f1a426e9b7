"""Worker of the 2-process tests (spawned by test_torch_distributed.py)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch_helpers import batches, model

import safeopt

STEPS = 4
POISONED_STEP = 2


CONFIGS = (("ddp", True), ("ddp", False), ("fsdp", True), ("fsdp", False))


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    """Runs every config of :data:`CONFIGS` in one process group (spawning is slow)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode, fused in CONFIGS:
            result = train(rank, mode, fused)
            torch.save(result, os.path.join(out_dir, f"{mode}-{fused}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


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
        "params": [_full(p).detach().clone() for p in net.parameters()],
    }


def _parallel(net: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _total_norm(net: torch.nn.Module) -> float:
    """The global gradient norm as torch computes it (DTensor: over all shards)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
    return float(_full(norm))
