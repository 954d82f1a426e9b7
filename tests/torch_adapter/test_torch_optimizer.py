"""The wrapper is a torch.optim.Optimizer: schedulers, hooks, state dicts, AMP, guards."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch_helpers import (
    assert_same_params,
    assert_same_state,
    backward,
    batches,
    model,
    train,
)

import safeopt
import safeopt.adapter as sa
from safeopt_torch import SafeOptimizer


def _wrapped(net: torch.nn.Module, policy: object = None, fused: bool = True,
             **kw: object) -> torch.optim.Optimizer:
    inner = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=fused, foreach=None, **kw)
    return safeopt.wrap(inner, {"clip_norm": 1.0} if policy is None else policy)


def test_is_an_optimizer_sharing_groups_and_state() -> None:
    net = model()
    inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = safeopt.wrap(inner, {})
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    train(net, opt, batches(2))
    assert len(inner.state) == 4
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(safeopt.AdapterError, match="already wrapped"):
        safeopt.wrap(opt, {})


def test_lr_scheduler_drives_the_inner_optimizer() -> None:
    net, ref_net = model(), model()
    opt = safeopt.wrap(torch.optim.SGD(net.parameters(), lr=0.1), {"clip_norm": None})
    ref = torch.optim.SGD(ref_net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for batch in batches(6, scale=1.0):
        for o, n, s in ((opt, net, sched), (ref, ref_net, ref_sched)):
            o.zero_grad()
            backward(n, batch)
            o.step()
            s.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert_same_params(net, ref_net)


def test_step_hooks_fire_on_the_wrapper() -> None:
    net = model()
    opt = _wrapped(net)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train(net, opt, batches(2))
    assert calls == ["pre", "post", "pre", "post"]


def test_add_param_group_grows_per_tensor_state() -> None:
    net = model()
    opt = _wrapped(net, {"clip_norm": 1.0}, fused=False)
    train(net, opt, batches(2))
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})
    assert opt.inner.param_groups[-1]["params"][0] is extra
    x, y = batches(1)[0]
    opt.zero_grad()
    (torch.nn.functional.mse_loss(net(x), y) + extra.sum()).backward()
    opt.step()
    stats = safeopt.stats(opt)
    assert stats["steps"] == 3
    assert len(stats["names"]) == 5
    assert not torch.equal(extra.detach(), torch.ones(3))


def test_names_come_from_named_parameters() -> None:
    net = model()
    opt = safeopt.wrap(torch.optim.AdamW(net.named_parameters(), lr=1e-3), {})
    assert safeopt.stats(opt)["names"] == [n for n, _ in net.named_parameters()]
    plain = safeopt.wrap(torch.optim.AdamW(model().parameters(), lr=1e-3), {})
    assert safeopt.stats(plain)["names"] == ["param0", "param1", "param2", "param3"]


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_state_dict_resume_is_bit_identical(fused: bool) -> None:
    data = batches(20)
    poison = {3: math.nan, 12: math.inf}
    net = model()
    opt = _wrapped(net, {"clip_norm": 1.0, "monitor_every": 3}, fused=fused)
    train(net, opt, data, poison=poison)

    first = model()
    first_opt = _wrapped(first, {"clip_norm": 1.0, "monitor_every": 3}, fused=fused)
    train(first, first_opt, data[:10], poison=poison)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    second = model(seed=5)
    second.load_state_dict(saved["model"])
    second_opt = _wrapped(second, {"clip_norm": 1.0, "monitor_every": 3}, fused=fused)
    second_opt.load_state_dict(saved["opt"])
    train(second, second_opt, data[10:], poison={i - 10: v for i, v in poison.items()})

    assert_same_params(net, second)
    assert_same_state(opt, second_opt)
    a, b = safeopt.stats(opt), safeopt.stats(second_opt)
    for key in ("steps", "skips", "norm_clips", "last_norm", "last_scale", "host_step"):
        assert a[key] == b[key], key
    _, state_a, _ = sa.read_state(opt)
    _, state_b, _ = sa.read_state(second_opt)
    for (name, a), b in zip(sa.flatten(state_a).items(), sa.flatten(state_b).values()):
        assert np.array_equal(a, b, equal_nan=True), name


def test_closure_and_loss() -> None:
    net = model()
    opt = _wrapped(net, {"clip_norm": 1.0}, fused=False)
    x, y = batches(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert safeopt.stats(opt)["last_loss"] == pytest.approx(float(loss.detach()))
    before = [p.detach().clone() for p in net.parameters()]
    closure()
    opt.step(loss=torch.tensor(math.nan))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert safeopt.stats(opt)["skips"] == 1


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_divergence_error_after_max_consecutive_skips(fused: bool) -> None:
    net = model()
    opt = _wrapped(net, {"clip_norm": 1.0, "max_consecutive_skips": 5}, fused=fused)
    train(net, opt, batches(2))
    data = batches(10)
    with pytest.raises(safeopt.DivergenceError) as info:
        train(net, opt, data, poison={i: math.nan for i in range(10)})
    assert info.value.stats["consecutive_skips"] == 5
    stats = safeopt.stats(opt)
    assert stats["consecutive_skips"] == 5
    assert stats["skips"] == 5
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_decides_on_unscaled_gradients(fused: bool) -> None:
    data = batches(6)
    net, ref_net = model(), model()
    opt = _wrapped(net, {"clip_norm": 1.0}, fused=fused)
    ref = _wrapped(ref_net, {"clip_norm": 1.0}, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for i, batch in enumerate(data):
        opt.zero_grad()
        ref.zero_grad()
        x, y = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            loss = torch.nn.functional.mse_loss(net(x), y)
        scaler.scale(loss).backward()
        if i == 3:  # an AMP overflow: the scaler's business, not a safeopt skip
            next(net.parameters()).grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        if i != 3:
            backward(ref_net, batch)
            ref.step()
    for pa, pb in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    stats, ref_stats = safeopt.stats(opt), safeopt.stats(ref)
    assert stats["skips"] == 0
    assert stats["steps"] == ref_stats["steps"] == 5
    assert stats["norm_clips"] == ref_stats["norm_clips"] > 0
    assert stats["last_norm"] == pytest.approx(ref_stats["last_norm"], rel=1e-5)
    assert scaler.get_scale() < 2.0 ** 12  # the overflow backed the scale off


@pytest.mark.parametrize("skip_nonfinite", [True, False])
@pytest.mark.parametrize("decide_on", ["host", "device"])
def test_last_step_skipped_reports_an_amp_overflow(decide_on: str, skip_nonfinite: bool) -> None:
    net = model()
    opt = SafeOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                        safeopt.Policy(clip_norm=1.0, skip_nonfinite=skip_nonfinite),
                        decide_on=decide_on)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    seen = []
    for i, (x, y) in enumerate(batches(5)):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
        if i == 3:  # an AMP overflow after clean steps: this step is skipped
            next(net.parameters()).grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        seen.append(opt.last_step_skipped)
    assert seen == [False, False, False, True, False]
    assert safeopt.stats(opt)["skips"] == 0  # the scaler's skip, not safeopt's


def test_grad_scaler_with_bf16_autocast_trains() -> None:
    net = model()
    opt = _wrapped(net, {"clip_norm": 1.0, "clip_value": 0.05}, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    for x, y in batches(5):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(net(x), y)
        scaler.scale(loss.float()).backward()
        scaler.step(opt)
        scaler.update()
        # decided and clipped on unscaled gradients (the fused kernel writes them back)
        assert max(float(p.grad.abs().max()) for p in net.parameters()) <= 0.05 * (1 + 1e-6)
    stats = safeopt.stats(opt)
    assert stats["steps"] == 5
    assert stats["value_clips"] == 5
    assert all(torch.isfinite(p).all() for p in net.parameters())
