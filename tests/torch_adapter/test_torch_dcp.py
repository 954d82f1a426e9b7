"""Checkpoints: safeopt's state in the state dict, through torch.distributed.checkpoint (DCP)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch_dcp_worker
import torch_dist_worker
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch_helpers import assert_same_params, assert_same_state, batches, model, train

import safeopt
import safeopt.adapter as sa
from safeopt_torch import SafeOptimizer

POLICY = {"clip_norm": 1.0, "monitor_every": 2}
POISON = {2: math.nan}


def _wrapped(net: torch.nn.Module, fused: bool = True, decide_on: str = "auto",
             groups: bool = False) -> SafeOptimizer:
    kw = {"fused": True} if fused else {"foreach": True}
    params: Any = net.parameters()
    if groups:  # weights and biases apart, as with weight decay on weights only
        params = [{"params": [p for p in net.parameters() if p.ndim > 1]},
                  {"params": [p for p in net.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kw)
    return SafeOptimizer(inner, safeopt.Policy(**POLICY), decide_on=decide_on)


def _same_safeopt_state(a: SafeOptimizer, b: SafeOptimizer) -> None:
    fa, fb = sa.flatten(a.read()[1]), sa.flatten(b.read()[1])
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        assert value.dtype == fb[key].dtype and np.array_equal(value, fb[key], equal_nan=True), key
    assert safeopt.stats(a)["host_step"] == safeopt.stats(b)["host_step"]


def test_every_param_group_carries_safeopt_state() -> None:
    net = model()
    opt = _wrapped(net, groups=True)
    train(net, opt, batches(4), poison=POISON)
    sd = opt.state_dict()
    assert "safeopt" not in sd
    first, second = (group["safeopt"] for group in sd["param_groups"])
    assert first is second
    assert first["host_step"] == 4 and json.loads(first["policy"]) == opt.policy.to_dict()
    assert int(first["state"]["counters.skips"]) == 1
    assert int(first["state"]["counters.steps"]) == 3
    # the live groups carry the key, so that DCP's flattened loads read it back
    assert all(group["safeopt"] is None for group in opt.param_groups)
    back = _wrapped(model(seed=3), groups=True)
    back.load_state_dict(sd)
    _same_safeopt_state(opt, back)
    assert all(group["safeopt"] is None for group in back.param_groups)


def test_the_previous_format_loads() -> None:
    """safeopt's state in a top-level ``"safeopt"`` entry, as the releases before wrote it."""
    net = model()
    opt = _wrapped(net)
    train(net, opt, batches(4), poison=POISON)
    sd = opt.state_dict()
    old = {"state": sd["state"],
           "param_groups": [{k: v for k, v in g.items() if k != "safeopt"}
                            for g in sd["param_groups"]],
           "safeopt": sd["param_groups"][0]["safeopt"]}
    back = _wrapped(model(seed=3))
    back.load_state_dict(old)
    _same_safeopt_state(opt, back)
    assert_same_state(opt, back)


def test_a_malformed_entry_is_refused() -> None:
    opt = _wrapped(model())
    sd = opt.state_dict()
    sd["param_groups"][0]["safeopt"] = 3
    with pytest.raises(ValueError, match=r"`safeopt` entry .* Received: safeopt=3"):
        opt.load_state_dict(sd)


def test_state_dict_hooks_registered_on_the_wrapper_run() -> None:
    net = model()
    opt = _wrapped(net)
    train(net, opt, batches(2))
    seen: list[Any] = []
    opt.inner.register_state_dict_pre_hook(lambda o: seen.append("inner_pre"))
    opt.register_state_dict_pre_hook(lambda o: seen.append(("pre", o is opt)))

    def post(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append(("post", sd["param_groups"][0]["safeopt"]["host_step"]))
        return {**sd, "extra": 1}

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["extra"] == 1
    assert seen == [("pre", True), "inner_pre", ("post", 2)]

    def load_pre(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append(("load_pre", sd["extra"]))
        groups = [{**g, "lr": 0.5} for g in sd["param_groups"]]
        return {k: v for k, v in sd.items() if k != "extra"} | {"param_groups": groups}

    back = _wrapped(model(seed=3))
    back.register_load_state_dict_pre_hook(load_pre)
    back.register_load_state_dict_post_hook(
        lambda o: seen.append(("load_post", o.param_groups[0]["lr"])))
    seen.clear()
    back.load_state_dict(sd)
    assert seen == [("load_pre", 1), ("load_post", 0.5)]
    assert safeopt.stats(back)["steps"] == 2


@pytest.mark.parametrize(("fused", "decide_on"),
                         [(True, "auto"), (False, "auto"), (True, "device")],
                         ids=["fused", "foreach", "fused-device"])
def test_dcp_state_creation_step_is_not_counted(fused: bool, decide_on: str) -> None:
    net = model()
    opt = _wrapped(net, fused, decide_on)
    before = [p.detach().clone() for p in net.parameters()]
    osd = get_optimizer_state_dict(net, opt)  # runs a zero-gradient step at lr 0 first
    assert len(opt.state) == 4  # the inner optimizer has created its state
    assert all(p.grad is None for p in net.parameters())
    stats = safeopt.stats(opt)
    assert (stats["steps"], stats["skips"], stats["host_step"]) == (0, 0, 0)
    _same_safeopt_state(opt, _wrapped(model(), fused, decide_on))
    assert osd["param_groups"][0]["safeopt"]["host_step"] == 0
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", ["lr 0, gradients", "lr > 0, zero gradients",
                                  "lr 0, zero gradients, with state",
                                  "lr 0, zero gradients, a user's first step"])
def test_other_steps_count(case: str) -> None:
    net = model()
    opt = _wrapped(net)
    if case.endswith("with state"):
        train(net, opt, batches(1))
    opt.zero_grad()
    for p in net.parameters():
        p.grad = torch.zeros_like(p) if "zero" in case else torch.ones_like(p)
    for group in opt.param_groups:
        group["lr"] = 0.0 if "lr 0" in case else 1e-2
    counted = safeopt.stats(opt)["steps"]
    opt.step()
    assert safeopt.stats(opt)["steps"] == counted + 1


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flattened"])
def test_dcp_round_trip_in_one_process(flat: bool, tmp_path: Path) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=flat)
    data = batches(8)
    net = model()
    opt = _wrapped(net, groups=True)
    train(net, opt, data, poison=POISON)

    first = model()
    first_opt = _wrapped(first, groups=True)
    train(first, first_opt, data[:5], poison=POISON)
    saved = get_optimizer_state_dict(first, first_opt, options=options)
    if flat:
        assert saved["param_groups.0.weight.safeopt"]["host_step"] == 5
    dcp.save({"model": first.state_dict(), "optim": saved}, checkpoint_id=tmp_path)
    second = model(seed=5)
    second_opt = _wrapped(second, groups=True)
    template = {"model": second.state_dict(),
                "optim": get_optimizer_state_dict(second, second_opt, options=options)}
    dcp.load(template, checkpoint_id=tmp_path)
    second.load_state_dict(template["model"])
    set_optimizer_state_dict(second, second_opt, template["optim"], options=options)
    train(second, second_opt, data[5:])

    assert_same_params(net, second)
    assert_same_state(opt, second_opt)
    _same_safeopt_state(opt, second_opt)


gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                          reason="torch.distributed with gloo is not available")


@gloo
@pytest.mark.parametrize("name", [c[0] for c in torch_dcp_worker.CONFIGS])
def test_fsdp2_resume_through_dcp_is_bit_identical(name: str, two_ranks: Path) -> None:
    for result in torch_dist_worker.load(two_ranks, "dcp_job", 2):
        run = result[name]
        full, resumed = run["uninterrupted"], run["resumed"]
        for a, b in zip(full["params"], resumed["params"]):
            assert torch.equal(a, b)
        assert full["inner"].keys() == resumed["inner"].keys()
        for key, entry in full["inner"].items():
            for field, value in entry.items():
                other = resumed["inner"][key][field]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) \
                    else value == other, (key, field)
        assert full["safeopt"].keys() == resumed["safeopt"].keys()
        for key, value in full["safeopt"].items():
            assert np.array_equal(value, resumed["safeopt"][key], equal_nan=True), key
        assert str(full["stats"]) == str(resumed["stats"])
        assert (full["stats"]["steps"], full["stats"]["skips"]) == (torch_dcp_worker.STEPS - 1, 1)
        # DCP's state-creating step on the fresh optimizer did not count, nor move a weight
        fresh = run["fresh"]
        assert (fresh["stats"]["steps"], fresh["stats"]["host_step"]) == (0, 0)
        assert fresh["inner_state"] == 4
        assert all(torch.equal(a, b) for a, b in zip(run["before"], fresh["params"]))
        # what was saved came back: 1 skip and 3 steps before step SAVE_AT
        for key in ("steps", "skips", "host_step", "last_norm", "norm_clips"):
            assert run["loaded"][key] == run["at_save"][key], key
        assert (run["loaded"]["steps"], run["loaded"]["skips"]) == (3, 1)
        assert run["hooks"] == ["state_dict_pre", ("state_dict_post", True), ("load_pre", True),
                                "load_post"]
