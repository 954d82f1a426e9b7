"""The divergence guard always fires, a fixed number of steps late, on every rank alike.

On an accelerator the step never waits for the device: the skip streak is
copied every step and read ``LAG`` steps later, waiting for the copy if
needed. A slow device (an event that never reports the copy done by itself)
cannot delay the error: it comes exactly ``LAG`` steps after the streak
reached the limit. Two gloo processes (DDP and FSDP2, one rank seeing every
NaN) raise on the same step.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch_helpers import batches, model

import safeopt
from safeopt_torch import SafeOptimizer
from safeopt_torch._watch import LAG, StreakWatch

LIMIT = 3
FIRST_NAN = 2  # NaN from this step on: the streak reaches LIMIT at step FIRST_NAN + LIMIT - 1


class SlowEvent:
    """An event whose copy never reports itself done; only waiting on it completes it."""

    waits = 0

    def __init__(self, device: Any = None) -> None:
        self.done = False

    def record(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        SlowEvent.waits += 1
        self.done = True


def _train(opt: torch.optim.Optimizer, net: torch.nn.Module, steps: int,
           poison_from: int, poisoned: bool = True) -> int | None:
    """Steps with NaN gradients from ``poison_from`` on; returns the step that raised."""
    for i, (x, y) in enumerate(batches(steps, seed=3)):
        if poisoned and i >= poison_from:
            x = x.clone()
            x[0, 0] = math.nan
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        try:
            opt.step()
        except safeopt.DivergenceError as err:
            assert err.stats["consecutive_skips"] == LIMIT
            assert "NaN/Inf" in str(err)
            return i
    return None


@pytest.mark.parametrize("lag", [0, 1, LAG, 5])
def test_error_comes_exactly_lag_steps_late_however_slow_the_device(lag: int) -> None:
    net = model()
    opt = SafeOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                        safeopt.Policy(max_consecutive_skips=LIMIT), decide_on="device")
    opt._run.watch = StreakWatch(lag=lag, event=SlowEvent)
    raised = _train(opt, net, 20, FIRST_NAN)
    assert raised == FIRST_NAN + LIMIT - 1 + lag
    if lag:
        assert SlowEvent.waits > 0
    assert all(torch.isfinite(p).all() for p in net.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: DDP and FSDP2, host and a slow device watch; rank 1 sees the NaN."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for mode in ("ddp", "fsdp"):
            for lag in (0, LAG):
                torch.manual_seed(0)
                net = _parallel(model(), mode)
                opt = SafeOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                                    safeopt.Policy(max_consecutive_skips=LIMIT),
                                    decide_on="device")
                opt._run.watch = StreakWatch(lag=lag, event=SlowEvent)
                results[(mode, lag)] = _train(opt, net, 12, FIRST_NAN, poisoned=rank == 1)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _parallel(net: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_every_rank_raises_on_the_same_step(tmp_path: Path) -> None:
    mp.spawn(run_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ranks[0]:
        _, lag = key
        want = FIRST_NAN + LIMIT - 1 + lag
        assert ranks[0][key] == ranks[1][key] == want, (key, ranks[0][key], ranks[1][key])
