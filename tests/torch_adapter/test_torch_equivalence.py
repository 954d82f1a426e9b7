"""The wrapped step matches torch's own clipping and an L2 term in the loss."""

from __future__ import annotations

import pytest
import torch
from torch_helpers import OPTIMIZERS, backward, batches, model

import safeopt

STEPS = 8


def _pair(name: str, fused: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                            torch.nn.Module, torch.optim.Optimizer]:
    kw = {"fused": True} if fused else {"foreach": True}
    net, ref_net = model(), model()
    return (net, OPTIMIZERS[name](net.parameters(), **kw),
            ref_net, OPTIMIZERS[name](ref_net.parameters(), **kw))


def _assert_close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_clip_norm_matches_clip_grad_norm(name: str, fused: bool) -> None:
    net, inner, ref_net, ref = _pair(name, fused)
    opt = safeopt.wrap(inner, {"clip_norm": 1.0})
    raw_norms = []
    for batch in batches(STEPS):
        opt.zero_grad()
        ref.zero_grad()
        backward(net, batch)
        backward(ref_net, batch)
        raw_norms.append(torch.nn.utils.clip_grad_norm_(ref_net.parameters(), 1.0))
        opt.step()
        ref.step()
    _assert_close(net, ref_net)
    stats = safeopt.stats(opt)
    assert stats["norm_clips"] == sum(int(n > 1.0) for n in raw_norms) > 0
    assert stats["last_norm"] == pytest.approx(float(raw_norms[-1]), rel=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_clip_value_matches_clip_grad_value(fused: bool) -> None:
    net, inner, ref_net, ref = _pair("AdamW", fused)
    opt = safeopt.wrap(inner, {"clip_norm": None, "clip_value": 0.05})
    for batch in batches(STEPS):
        opt.zero_grad()
        ref.zero_grad()
        backward(net, batch)
        backward(ref_net, batch)
        torch.nn.utils.clip_grad_value_(ref_net.parameters(), 0.05)
        opt.step()
        ref.step()
    _assert_close(net, ref_net)
    assert safeopt.stats(opt)["value_clips"] == STEPS


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_l2_matches_penalty_in_the_loss(fused: bool) -> None:
    net, inner, ref_net, ref = _pair("SGD-momentum", fused)
    opt = safeopt.wrap(inner, {"clip_norm": None, "l2": 0.01})
    for x, y in batches(STEPS, scale=1.0):
        opt.zero_grad()
        ref.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        penalty = sum((w * w).sum() for w in ref_net.parameters())
        (torch.nn.functional.mse_loss(ref_net(x), y) + 0.01 * penalty).backward()
        opt.step()
        ref.step()
    _assert_close(net, ref_net)


def test_per_tensor_and_unitwise_bound_the_gradients() -> None:
    for policy in ({"clip_norm": 0.1, "norm_scope": "per_tensor"},
                   {"clip_norm": 0.01, "norm_scope": "unitwise"}):
        net = model()
        opt = safeopt.wrap(torch.optim.SGD(net.parameters(), lr=0.0), policy)
        backward(net, batches(1)[0])
        opt.step()
        for p in net.parameters():
            if policy["norm_scope"] == "per_tensor":
                assert float(p.grad.norm()) <= 0.1 * (1 + 1e-5)
            else:
                dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
                unit_g = p.grad.norm(dim=dims) if dims else p.grad.norm()
                unit_w = p.norm(dim=dims) if dims else p.norm()
                assert torch.all(unit_g <= 0.01 * unit_w.clamp(min=1e-3) * (1 + 1e-5))
        assert safeopt.stats(opt)["norm_clips"] == 1


def test_adaptive_penalty_on_matches_the_fixed_penalty() -> None:
    """``penalty_when="weights_above"`` with a threshold always exceeded equals ``l2`` always."""
    runs = []
    for policy in ({"clip_norm": None, "l1": 0.001, "l2": 0.01},
                   {"clip_norm": None, "l1": 0.001, "l2": 0.01,
                    "penalty_when": "weights_above", "weight_norm_max": 1e-3}):
        net = model()
        opt = safeopt.wrap(torch.optim.SGD(net.parameters(), lr=0.1), policy)
        for batch in batches(4, scale=1.0):
            opt.zero_grad()
            backward(net, batch)
            opt.step()
        runs.append(net)
    _assert_close(*runs)
    net = model()
    off = safeopt.wrap(torch.optim.SGD(net.parameters(), lr=0.1),
                       {"clip_norm": None, "l2": 0.01, "penalty_when": "weights_above",
                        "weight_norm_max": 1e6})
    ref_net = model()
    ref = torch.optim.SGD(ref_net.parameters(), lr=0.1)
    for batch in batches(3, scale=1.0):
        for o, n in ((off, net), (ref, ref_net)):
            o.zero_grad()
            backward(n, batch)
            o.step()
    _assert_close(net, ref_net)  # below the threshold the penalty stays off
