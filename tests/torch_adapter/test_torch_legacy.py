"""A state dict written by safeopt 0.1.0 loads, and the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import safeopt
from safeopt_torch import SafeOptimizer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "v0_1_0"


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


@pytest.mark.parametrize("decide_on", ["host", "device"])
def test_a_0_1_state_dict_loads_and_training_goes_on(decide_on: str) -> None:
    saved = torch.load(FIXTURES / "torch_adamw_fused.pt", weights_only=False)
    want = json.loads((FIXTURES / "torch_adamw_fused.json").read_text())
    net = _net()
    net.load_state_dict(saved["model"])
    opt = SafeOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                        safeopt.load_policy(saved["policy"]), decide_on=decide_on)
    opt.load_state_dict(saved["optimizer"])
    stats = safeopt.stats(opt)
    for key in ("steps", "skips", "consecutive_skips", "nonfinite", "spikes", "norm_clips",
                "host_step"):
        assert stats[key] == want[key], key
    for key in ("last_norm", "last_scale", "threshold", "last_loss", "last_weight_norm"):
        assert stats[key] == pytest.approx(want[key]), key
    x, y = torch.randn(8, 4) * 5, torch.randn(8, 2)
    loss = torch.nn.functional.mse_loss(net(x), y)
    loss.backward()
    opt.step(loss=loss.detach())
    assert safeopt.stats(opt)["steps"] == want["steps"] + 1
    assert safeopt.diagnose(opt).updates == want["steps"] + want["skips"] + 1
