"""Trainers' wrappers around the optimizer: what is called on them reaches safeopt."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

import safeopt

L = pytest.importorskip("lightning.pytorch")
warnings.filterwarnings("ignore", module="lightning")


class _Manual(L.LightningModule):
    """Manual optimisation: ``self.optimizers().set_loss(...)`` before each step."""

    def __init__(self, given: dict[int, float]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.automatic_optimization = False
        self.given = given  # batch index -> the loss handed to set_loss instead of the real one
        self.losses: list[float] = []
        self.wrapper: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        self.wrapper = opt
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        value = self.given.get(batch_idx, float(loss.detach()))
        self.losses.append(value)
        opt.set_loss(torch.tensor(value))
        opt.step()

    def configure_optimizers(self) -> Any:
        return safeopt.wrap(torch.optim.SGD(self.parameters(), lr=0.1), {"clip_norm": 10.0})


def test_set_loss_on_lightnings_optimizer_reaches_the_policy() -> None:
    module = _Manual({1: math.nan})
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(48, 4, generator=generator),
                                          torch.randn(48, 1, generator=generator))
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    assert type(module.wrapper).__name__ == "LightningSafeOptimizer"
    stats = safeopt.stats(trainer.optimizers[0])
    assert stats["skips"] == 1 and stats["nonfinite"] == 1  # the NaN loss of batch 1
    assert stats["steps"] == 2
    assert stats["last_loss"] == pytest.approx(module.losses[-1])
