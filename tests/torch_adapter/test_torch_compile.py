"""The wrapper works inside a ``torch.compile``-d training step."""

from __future__ import annotations

import math

import pytest
import torch
from torch_helpers import batches, model

import safeopt


@pytest.mark.parametrize("fused", [True], ids=["fused"])
def test_compiled_training_step_matches_eager(fused: bool) -> None:
    data = batches(4)
    nets = [model(), model()]
    opts = [safeopt.wrap(torch.optim.AdamW(n.parameters(), lr=1e-2, fused=fused),
                         {"clip_norm": 1.0}) for n in nets]

    def step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    compiled = torch.compile(step)
    for i, (x, y) in enumerate(data):
        if i == 2:
            x = x.clone()
            x[0, 0] = math.nan
        step(nets[0], opts[0], x, y)
        compiled(nets[1], opts[1], x, y)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    eager, comp = safeopt.stats(opts[0]), safeopt.stats(opts[1])
    assert (comp["steps"], comp["skips"]) == (eager["steps"], eager["skips"]) == (3, 1)
    assert comp["norm_clips"] == eager["norm_clips"] > 0
