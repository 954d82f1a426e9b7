"""CPU decisions on the host: the same run as device decisions, with less work."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch_helpers import OPTIMIZERS, assert_same_params, assert_same_state, batches, model

import safeopt
import safeopt.adapter as sa
from safeopt_torch import SafeOptimizer

POLICIES = {
    "default": {"clip_norm": 1.0},
    "value-l2": {"clip_norm": 1.0, "clip_value": 0.05, "l2": 1e-3},
    "agc": "agc",
    "zscore": {"adaptive": "zscore", "warmup": 3},
    "spike": {"spike_skip": "loss", "spike_warmup": 4, "spike_window": 8},
    "per-tensor": {"clip_norm": 0.5, "norm_scope": "per_tensor"},
}
POISON = {2: math.nan, 9: math.inf, 10: math.nan}


def _run(name: str, kw: dict, policy: object, decide_on: str,
         steps: int = 16) -> tuple[torch.nn.Module, SafeOptimizer]:
    net = model()
    opt = SafeOptimizer(OPTIMIZERS[name](net.parameters(), **kw),
                        safeopt.load_policy(policy), decide_on=decide_on)
    data = batches(steps)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        with torch.enable_grad():
            loss = torch.nn.functional.mse_loss(net(x * (0.02 if i % 3 == 0 else 1.0)), y)
            loss.backward()
        if i in POISON:
            next(net.parameters()).grad.view(-1)[1] = POISON[i]
        opt.step(loss=loss.detach())
    return net, opt


@pytest.mark.parametrize("kw", [{"fused": True}, {"foreach": True}], ids=["fused", "foreach"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_host_and_device_decisions_give_the_same_run(name: str, kw: dict, policy: str) -> None:
    host_net, host = _run(name, kw, POLICIES[policy], "host")
    dev_net, dev = _run(name, kw, POLICIES[policy], "device")
    assert_same_params(host_net, dev_net)
    assert_same_state(host, dev)
    _, host_state, host_extra = host.read()
    _, dev_state, dev_extra = dev.read()
    assert (host_extra["decisions"], dev_extra["decisions"]) == ("host", "device")
    for (field, a), b in zip(sa.flatten(host_state).items(), sa.flatten(dev_state).values()):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), field
    stats = safeopt.stats(host)
    assert stats["skips"] >= 2 and stats["steps"] >= 10


def test_host_path_skips_without_a_kernel_and_scales_only_clipped_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = model()
    opt = safeopt.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                       {"clip_norm": 1.0})
    assert safeopt.stats(opt)["decisions"] == "host"
    calls: list[object] = []
    real = torch._fused_adamw_

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("grad_scale"))
        assert kwargs.get("found_inf") is None
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    x, y = batches(1)[0]
    for scale, poison in [(10.0, None), (1e-4, None), (10.0, math.nan)]:
        opt.zero_grad()
        with torch.enable_grad():
            torch.nn.functional.mse_loss(net(x * scale), y * scale).backward()
        if poison is not None:
            next(net.parameters()).grad.view(-1)[0] = poison
        opt.step()
    assert len(calls) == 2  # the NaN step ran no kernel
    clipped, unclipped = calls
    assert isinstance(clipped, torch.Tensor) and float(clipped) > 1.0  # divides by norm / 1.0
    assert unclipped is None  # scale 1: no grad_scale, so no write-back of the gradients
    stats = safeopt.stats(opt)
    assert (stats["steps"], stats["skips"], stats["norm_clips"]) == (2, 1, 1)


def test_checkpoints_move_between_host_and_device_decisions() -> None:
    data = batches(6)
    net = model()
    host = SafeOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                         safeopt.Policy(), decide_on="host")
    for x, y in data[:3]:
        host.zero_grad()
        with torch.enable_grad():
            torch.nn.functional.mse_loss(net(x), y).backward()
        host.step()
    buffer = io.BytesIO()
    torch.save(host.state_dict(), buffer)
    buffer.seek(0)
    dev = SafeOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                        safeopt.Policy(), decide_on="device")
    dev.load_state_dict(torch.load(buffer))
    assert safeopt.stats(dev)["steps"] == safeopt.stats(host)["steps"] == 3
    back = SafeOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True),
                         safeopt.Policy(), decide_on="host")
    back.load_state_dict(dev.state_dict())
    for (field, a), b in zip(sa.flatten(host.read()[1]).items(),
                             sa.flatten(back.read()[1]).values()):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), field


def test_decide_on_is_checked() -> None:
    opt = torch.optim.SGD(model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"`decide_on` must be one of .* decide_on='gpu'"):
        SafeOptimizer(opt, safeopt.Policy(), decide_on="gpu")


def test_cpu_norms_match_the_foreach_norms() -> None:
    from safeopt_torch import _kernels

    gen = torch.Generator().manual_seed(0)
    big = torch.randn(300, 400, generator=gen)  # 120k elements: the dot-product kernel
    tensors = [big, torch.randn(7, generator=gen), big.t(),  # non-contiguous: foreach
               torch.randn(1 << 17, generator=gen) * 1e-3,
               torch.full((1 << 16,), math.inf), torch.zeros(1 << 16)]
    got = _kernels._cpu_norms(tensors)
    want = torch.stack([torch.linalg.vector_norm(t.double()).float() for t in tensors])
    assert got.dtype == torch.float32 and got.shape == (len(tensors),)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    doubles = [t.double() for t in tensors[:2]]
    torch.testing.assert_close(_kernels._cpu_norms(doubles), want[:2], rtol=1e-6, atol=0.0)


def test_pickled_wrapper_continues_the_same_run() -> None:
    import copy

    data = batches(6)
    net = model()
    opt = safeopt.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True), {})

    def run(n: torch.nn.Module, o: torch.optim.Optimizer, part: list) -> None:
        for x, y in part:
            o.zero_grad()
            with torch.enable_grad():
                torch.nn.functional.mse_loss(n(x), y).backward()
            o.step()

    run(net, opt, data[:3])
    twin_net, twin = copy.deepcopy((net, opt))  # parameters and optimizer stay linked
    assert twin.decisions == "host"
    run(net, opt, data[3:])
    run(twin_net, twin, data[3:])
    assert_same_params(net, twin_net)
    assert safeopt.stats(twin)["steps"] == safeopt.stats(opt)["steps"] == 6
