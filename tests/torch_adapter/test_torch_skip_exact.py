"""A skipped step never happened: bit-exact comparison with a run that leaves the batch out."""

from __future__ import annotations

import math

import pytest
import torch
from torch_helpers import (
    OPTIMIZERS,
    assert_same_params,
    assert_same_state,
    batches,
    model,
    train,
)

import safeopt
from safeopt_torch import SafeOptimizer

STEPS = 50
POISON = {0: math.nan, 7: math.inf, 23: math.nan, 24: -math.inf, 41: math.nan}


@pytest.mark.parametrize("decide_on", ["host", "device"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("policy", [{"clip_norm": 1.0}, {"clip_norm": None}],
                         ids=["clip", "skip-only"])
def test_skipped_steps_never_happened(name: str, fused: bool, policy: dict,
                                      decide_on: str) -> None:
    data = batches(STEPS)
    kw = {"fused": True} if fused else {"foreach": True}

    net = model()
    opt = SafeOptimizer(OPTIMIZERS[name](net.parameters(), **kw), safeopt.Policy(**policy),
                        decide_on=decide_on)
    train(net, opt, data, poison=POISON)

    ref_net = model()
    ref_inner = OPTIMIZERS[name](ref_net.parameters(), **kw)
    # Without clipping the reference is the bare optimizer; with it, the same wrapper.
    ref = ref_inner if policy["clip_norm"] is None else SafeOptimizer(
        ref_inner, safeopt.Policy(**policy), decide_on=decide_on)
    train(ref_net, ref, [b for i, b in enumerate(data) if i not in POISON])

    assert_same_params(net, ref_net)
    assert_same_state(opt, ref)
    stats = safeopt.stats(opt)
    assert stats["path"] == ("fused" if fused else "foreach")
    assert stats["decisions"] == decide_on
    assert stats["skips"] == len(POISON)
    assert stats["nonfinite"] == len(POISON)
    assert stats["steps"] == STEPS - len(POISON)
    assert stats["consecutive_skips"] == 0
    if policy["clip_norm"] is not None:
        ref_stats = safeopt.stats(ref)
        assert stats["norm_clips"] == ref_stats["norm_clips"] > 0
        assert stats["last_norm"] == ref_stats["last_norm"]
        assert stats["last_scale"] == ref_stats["last_scale"]
    for p in net.parameters():
        assert torch.isfinite(p).all()


def test_skip_of_last_step_leaves_state_as_before() -> None:
    net = model()
    opt = safeopt.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True), {})
    data = batches(3)
    train(net, opt, data[:2])
    before_params = [p.detach().clone() for p in net.parameters()]
    before_state = {k: {n: v.clone() for n, v in s.items()}
                    for k, s in opt.state_dict()["state"].items()}
    train(net, opt, data[2:], poison={0: math.nan})
    for p, q in zip(net.parameters(), before_params):
        assert torch.equal(p, q)
    for key, entry in opt.state_dict()["state"].items():
        for n, v in entry.items():
            assert torch.equal(v, before_state[key][n]), (key, n)
    assert safeopt.stats(opt)["consecutive_skips"] == 1
