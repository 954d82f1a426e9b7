"""The device path (the one CUDA takes) never reads the device back, checked at the dispatcher.

A ``TorchDispatchMode`` sees every aten call the wrapper makes: the guard
fails on any read-back (``aten::_local_scalar_dense``, which ``item()``,
``bool()`` and 0-d tensor indexing call in C++, ``aten::item``,
``aten::is_nonzero``, ``aten::equal``) and on any tensor built from host data
during a step (``aten::lift_fresh``, which ``torch.tensor(...)`` and
``torch.as_tensor(python_value)`` call: on an accelerator, a blocking copy of
pageable memory). The inner optimizer's own step is left out (what torch's
foreach AdamW reads, it reads without safeopt too). The fused path must read
nothing; the foreach path reads once (one ``item()`` of a packed int64).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch_helpers import batches, model

import safeopt
from safeopt.adapter import PRESETS
from safeopt_torch import SafeOptimizer

READS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
                   "aten::equal"})
FROM_HOST = frozenset({"aten::lift_fresh", "aten::lift_fresh_copy"})


class Guard(TorchDispatchMode):
    """Counts read-backs and tensors made from host data, by aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        name = func._schema.name
        if name in READS or name in FROM_HOST:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return sum(n for op, n in self.calls.items() if op in READS)

    @property
    def from_host(self) -> int:
        return sum(n for op, n in self.calls.items() if op in FROM_HOST)


@contextmanager
def unguarded_inner(opt: SafeOptimizer) -> Iterator[None]:
    """Runs the inner optimizer's own step outside the guard (its class, swapped meanwhile)."""
    inner = opt.inner
    cls = type(inner)

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():
            return cls.step(self, *args, **kwargs)

    inner.__class__ = type(cls.__name__, (cls,), {"step": step})
    try:
        yield
    finally:
        inner.__class__ = cls


POLICIES = [*sorted(PRESETS), "per_tensor", "value_l2"]


def _policy(name: str) -> safeopt.Policy:
    if name == "per_tensor":
        return safeopt.Policy(norm_scope="per_tensor")
    if name == "value_l2":
        return safeopt.Policy(clip_value=0.05, l1=1e-4, l2=1e-3,
                              penalty_when="weights_above", weight_norm_max=1.0)
    return safeopt.Policy.from_preset(name).replace(spike_warmup=2, spike_window=4, warmup=2,
                                                    history=8)


def _backward(opt: SafeOptimizer, net: torch.nn.Module, batch: Any,
              poison: bool = False) -> torch.Tensor:
    opt.zero_grad()
    with torch.enable_grad():
        loss = torch.nn.functional.mse_loss(net(batch[0]), batch[1])
        loss.backward()
    if poison:
        with torch.no_grad():
            next(net.parameters()).grad[0, 0] = math.nan
    return loss.detach()


@pytest.mark.parametrize("with_loss", [True, False], ids=["loss", "no-loss"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("policy", POLICIES)
def test_device_path_reads_nothing_but_the_foreach_flags(policy: str, fused: bool,
                                                         with_loss: bool) -> None:
    pol = _policy(policy)
    if pol.spike_skip == "loss" and not with_loss:
        pytest.skip("spike_skip='loss' needs the loss")
    net = model()
    inner = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=fused,
                              foreach=None if fused else True)
    opt = SafeOptimizer(inner, pol.replace(monitor_every=2), decide_on="device")
    data = batches(10)
    for batch in data[:4]:  # warm-up: the inner state, the index caches
        loss = _backward(opt, net, batch)
        opt.step(loss=loss if with_loss else None)
    guard = Guard()
    for i, batch in enumerate(data[4:]):
        loss = _backward(opt, net, batch, poison=i == 2)  # one skipped step among them
        with unguarded_inner(opt), guard:  # only the protected step is watched
            opt.step(loss=loss if with_loss else None)
    steps = len(data) - 4
    assert guard.from_host == 0, guard.calls
    can_skip = pol.skip_nonfinite or pol.spike_skip is not None
    expected = 0 if fused or not can_skip else steps
    assert guard.reads == expected, guard.calls
    stats = safeopt.stats(opt)
    assert stats["path"] == ("fused" if fused else "foreach")
    assert stats["steps"] + stats["skips"] == len(data)
    assert stats["skips"] == (1 if pol.skip_nonfinite else 0)


def test_the_guard_sees_what_it_must() -> None:
    """The guard fails on the reads that Python-level patching could not see."""
    x = torch.ones(4)
    guard = Guard()
    with guard:
        _ = x[torch.tensor(1)]  # 0-d tensor indexing: a read in C++
        _ = torch.as_tensor(2.0)  # a tensor made from host data
        bool(x.sum() > 0)
    assert guard.reads == 2 and guard.from_host == 2


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adam"])
def test_every_fused_optimizer_reads_nothing(name: str) -> None:
    net = model()
    make = {"SGD": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
            "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
            "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True)}[name]
    opt = SafeOptimizer(make(net.parameters()), safeopt.Policy(max_consecutive_skips=3),
                        decide_on="device")
    data = batches(6)
    opt.step(loss=_backward(opt, net, data[0]))  # the first step creates the inner state
    guard = Guard()
    for i, batch in enumerate(data[1:]):
        loss = _backward(opt, net, batch, poison=i == 1)
        with unguarded_inner(opt), guard:
            opt.step(loss=loss)
    assert guard.reads == 0 and guard.from_host == 0, guard.calls
    stats = safeopt.stats(opt)
    assert (stats["path"], stats["steps"], stats["skips"]) == ("fused", 5, 1)
