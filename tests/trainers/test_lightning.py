"""safeopt in a real Lightning ``Trainer``: the closure's loss, and the clipping guard."""

from __future__ import annotations

import math
import sys
import warnings
from importlib import metadata
from typing import Any

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

import safeopt  # noqa: E402
from safeopt_torch.lightning import (  # noqa: E402
    SafeoptLightningCallback,
    lightning_callbacks,
    pytorch_lightning_callbacks,
)

warnings.filterwarnings("ignore", module="lightning")


class _Module(L.LightningModule):
    def __init__(self, policy: Any = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.policy = policy
        self.losses: list[float] = []
        self.wrapper: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        self.wrapper = self.optimizers()  # Lightning's LightningOptimizer
        return loss

    def configure_optimizers(self) -> Any:
        return safeopt.wrap(torch.optim.SGD(self.parameters(), lr=0.1), self.policy)


def _loader() -> Any:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=generator), torch.randn(64, 1, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _registered(group: str, factory: Any) -> bool:
    target = f"safeopt_torch.lightning:{factory.__name__}"
    return target in [ep.value for ep in metadata.entry_points(group=group)]


STALE = "safeopt's installed metadata lacks its Lightning entry points: reinstall safeopt"


def _fit(module: Any, callbacks: Any = (), **kwargs: Any) -> Any:
    options = {"max_steps": 3, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False,
               "accelerator": "cpu", **kwargs}
    trainer = L.Trainer(callbacks=list(callbacks), **options)
    trainer.fit(module, _loader())
    return trainer


def test_the_closures_loss_reaches_the_policy() -> None:
    module = _Module({"clip_norm": 1e-3})
    trainer = _fit(module)
    for optimizer in (trainer.optimizers[0], module.wrapper):
        stats = safeopt.stats(optimizer)
        assert stats["steps"] == 3 and stats["norm_clips"] == 3
        assert math.isfinite(stats["last_loss"])
        assert stats["last_loss"] == pytest.approx(module.losses[-1])
    assert type(module.wrapper).__name__ == "LightningSafeOptimizer"


def test_with_gradient_accumulation_the_policy_gets_lightnings_closure_loss() -> None:
    module = _Module()
    trainer = _fit(module, accumulate_grad_batches=2, max_steps=2)
    stats = safeopt.stats(trainer.optimizers[0])
    assert stats["steps"] == 2 and len(module.losses) == 4
    # The last micro-batch's loss divided by 2, as Lightning's closure returns it.
    assert stats["last_loss"] == pytest.approx(module.losses[-1] / 2)


def test_the_callback_subclasses_the_lightning_package_already_imported(
        monkeypatch: Any) -> None:
    import pytorch_lightning

    from safeopt_torch import lightning as adapter

    assert adapter._callback_base() is L.Callback
    monkeypatch.delitem(sys.modules, "lightning")
    assert adapter._callback_base() is pytorch_lightning.Callback


@pytest.mark.parametrize(("algorithm", "policy", "remedy"), [
    ("norm", {"clip_norm": 1.0}, "{'clip_norm': 0.5, 'norm_scope': 'global'}"),
    ("value", {"clip_norm": None, "clip_value": 1.0}, "{'clip_value': 0.5}"),
])
@pytest.mark.parametrize("explicit", [False, True], ids=["entry_point", "callback"])
def test_gradient_clip_val_with_a_clipping_policy_is_refused_with_the_remedy(
        algorithm: str, policy: dict[str, Any], remedy: str, explicit: bool) -> None:
    callbacks = [SafeoptLightningCallback()] if explicit else []
    assert explicit or _registered("lightning.pytorch.callbacks_factory", lightning_callbacks), \
        STALE
    with pytest.raises(ValueError, match="gradient_clip_val` must not be set") as error:
        _fit(_Module(policy), callbacks, gradient_clip_val=0.5,
             gradient_clip_algorithm=algorithm)
    assert f"gradient_clip_algorithm={algorithm!r}" in str(error.value)
    assert str(error.value).endswith(f"clip in the policy instead: {remedy}.")


def test_gradient_clip_val_with_a_policy_that_does_not_clip_is_allowed() -> None:
    trainer = _fit(_Module({"clip_norm": None}), gradient_clip_val=1e-3)
    stats = safeopt.stats(trainer.optimizers[0])
    assert stats["steps"] == 3 and stats["last_norm"] == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize(("group", "factory", "package"), [
    ("lightning.pytorch.callbacks_factory", lightning_callbacks, "lightning.pytorch"),
    ("pytorch_lightning.callbacks_factory", pytorch_lightning_callbacks, "pytorch_lightning"),
])
def test_the_guard_is_registered_with_lightning(group: str, factory: Any, package: str) -> None:
    assert _registered(group, factory), STALE
    base = pytest.importorskip(package).Callback
    (guard,) = factory()
    assert isinstance(guard, base) and type(guard).__name__ == "SafeoptClippingGuard"
