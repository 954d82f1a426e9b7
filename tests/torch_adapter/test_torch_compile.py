"""The protected step compiles whole: ``torch.compile(..., fullgraph=True)`` matches eager."""

from __future__ import annotations

import pytest
import torch
from torch_helpers import batches, fresh_backward, model

import safeopt
from safeopt_torch import SafeOptimizer

STEPS, NAN_AT = 7, 4


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    """Each test compiles its own optimizer: start from an empty compile cache."""
    torch._dynamo.reset()


def _make(fused: bool, policy: dict) -> tuple[torch.nn.Module, SafeOptimizer]:
    net = model()
    inner = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=fused,
                              foreach=None if fused else True)
    return net, SafeOptimizer(inner, safeopt.Policy(**policy), decide_on="device")


# Inductor for the default policy; the other policies trace the same way (fullgraph) and are
# checked through AOTAutograd without code generation, which keeps the test short.
@pytest.mark.parametrize(("policy", "backend"), [({}, "inductor"),
                                                 ({"adaptive": "zscore", "warmup": 2},
                                                  "aot_eager"),
                                                 ({"spike_skip": "loss", "spike_warmup": 2,
                                                   "clip_value": 0.5}, "aot_eager")],
                         ids=["default", "zscore", "spike-value"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_compiled_protected_step_matches_eager(fused: bool, policy: dict, backend: str) -> None:
    data = batches(STEPS)
    eager_net, eager = _make(fused, {**policy, "monitor_every": 2})
    net, opt = _make(fused, {**policy, "monitor_every": 2})
    for n, o in ((eager_net, eager), (net, opt)):  # the inner state exists before compiling
        o.step(loss=fresh_backward(n, o, data[0], nan=False))

    @torch.compile(fullgraph=True, backend=backend)
    def step(loss: torch.Tensor) -> None:
        opt.step(loss=loss)

    for i, batch in enumerate(data[1:], 1):
        eager.step(loss=fresh_backward(eager_net, eager, batch, nan=i == NAN_AT))
        step(fresh_backward(net, opt, batch, nan=i == NAN_AT))
    for a, b in zip(eager_net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(eager_net.parameters(), net.parameters()):
        for name, value in eager.inner.state[pa].items():
            torch.testing.assert_close(opt.inner.state[pb][name], value, rtol=1e-5, atol=1e-6)
    want, got = safeopt.stats(eager), safeopt.stats(opt)
    for field in ("steps", "skips", "norm_clips", "nonfinite"):
        assert got[field] == want[field], field
    assert got["skips"] >= 1 and got["steps"] + got["skips"] == STEPS
    for field in ("last_norm", "last_loss", "last_weight_norm", "threshold"):
        assert got[field] == pytest.approx(want[field], rel=1e-5), field
    opt.step(loss=fresh_backward(net, opt, data[1], nan=False))  # eager again after compiled steps
    eager.step(loss=fresh_backward(eager_net, eager, data[1], nan=False))
    assert safeopt.stats(opt)["steps"] == safeopt.stats(eager)["steps"]
    assert safeopt.stats(opt)["host_step"] == safeopt.stats(eager)["host_step"]


def test_compiling_before_the_inner_state_exists_is_refused() -> None:
    net, opt = _make(True, {})

    @torch.compile(fullgraph=True, backend="eager")
    def step() -> None:
        opt.step()

    fresh_backward(net, opt, batches(1)[0], nan=False)
    with pytest.raises(Exception, match="take one step eagerly"):
        step()


def test_compiling_host_decisions_is_refused_with_the_remedy() -> None:
    net = model()
    opt = safeopt.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2), {})
    fresh_backward(net, opt, batches(1)[0], nan=False)
    opt.step()

    @torch.compile(fullgraph=True, backend="eager")
    def step() -> None:
        opt.step()

    fresh_backward(net, opt, batches(1)[0], nan=False)
    with pytest.raises(Exception, match="decide_on='device'"):
        step()
