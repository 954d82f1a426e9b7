"""Shared pieces of the torch adapter tests: a tiny model and deterministic batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "Adam": lambda params, **kw: torch.optim.Adam(params, lr=1e-2, **kw),
    "AdamW": lambda params, **kw: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kw),
    "SGD-momentum": lambda params, **kw: torch.optim.SGD(params, lr=1e-2, momentum=0.9, **kw),
}


def model(seed: int = 0) -> torch.nn.Module:
    """A small MLP, the same weights for the same seed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batches(n: int, seed: int = 1, scale: float = 10.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` deterministic ``(x, y)`` batches; ``scale`` makes gradients large enough to clip."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=gen) * scale, torch.randn(16, 4, generator=gen))
            for _ in range(n)]


def backward(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Computes the MSE loss of ``batch`` and its gradients; returns the loss."""
    x, y = batch
    loss = torch.nn.functional.mse_loss(net(x), y)
    loss.backward()
    return loss.detach()


def fresh_backward(net: torch.nn.Module, opt: torch.optim.Optimizer,
                   batch: tuple[torch.Tensor, torch.Tensor], nan: bool = False) -> torch.Tensor:
    """``zero_grad``, then :func:`backward`; with ``nan``, one gradient element becomes NaN."""
    opt.zero_grad()
    loss = backward(net, batch)
    if nan:
        with torch.no_grad():
            next(net.parameters()).grad.view(-1)[0] = math.nan
    return loss


def train(net: torch.nn.Module, opt: torch.optim.Optimizer,
          data: Iterable[tuple[torch.Tensor, torch.Tensor]],
          poison: dict[int, float] | None = None, **step_kwargs: Any) -> None:
    """Runs one step per batch; ``poison[i]`` is written into a gradient at step ``i``."""
    for i, batch in enumerate(data):
        opt.zero_grad()
        backward(net, batch)
        if poison and i in poison:
            first = next(net.parameters())
            first.grad.view(-1)[3] = poison[i]
        opt.step(**step_kwargs)


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """The two optimizers' per-parameter states are equal bit for bit."""
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            va, vb = sa[key][name], sb[key][name]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), (key, name)
            else:
                assert va == vb, (key, name)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The two models' parameters are equal bit for bit."""
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
