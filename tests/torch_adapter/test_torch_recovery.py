"""Recovery in torch: a poisoned weight and a long NaN streak are rolled back, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from test_torch_divergence_guard import SlowEvent
from torch_helpers import assert_same_params, batches, fresh_backward, model

import safeopt
from safeopt.testing.cases import STREAK
from safeopt_torch import SafeOptimizer
from safeopt_torch._watch import StreakWatch

POLICY = {"recover": True, "snapshot_every": 4, "max_consecutive_skips": 3,
          "recover_warmup": 4, "recover_lr_factor": 0.25, "monitor_every": 1}


def _wrapped(fused: bool, decide_on: str, **policy: object) -> tuple[torch.nn.Module,
                                                                    SafeOptimizer]:
    net = model()
    inner = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=fused,
                              foreach=None if fused else True)
    return net, SafeOptimizer(inner, safeopt.Policy(**{**POLICY, **policy}),
                              decide_on=decide_on)


def _step(net: torch.nn.Module, opt: SafeOptimizer, batch: tuple, nan: bool = False) -> None:
    opt.step(loss=fresh_backward(net, opt, batch, nan))


def _state_copy(opt: SafeOptimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in opt.inner.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("decide_on", ["host", "device"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_a_nan_streak_longer_than_the_limit_is_rolled_back_bit_for_bit(fused: bool,
                                                                       decide_on: str) -> None:
    data = batches(20)
    net, opt = _wrapped(fused, decide_on)
    for batch in data[:4]:  # updates 0-3; update 4 is on the snapshot cadence
        _step(net, opt, batch)
    snapshot_net = model()
    snapshot_net.load_state_dict(net.state_dict())
    snapshot_state = _state_copy(opt)
    _step(net, opt, data[4])  # update 4 (healthy): snapshot of the state before it
    _step(net, opt, data[5])
    for batch in data[6:9]:  # updates 6-8: NaN; the third reaches max_consecutive_skips
        _step(net, opt, batch, nan=True)
    assert_same_params(net, snapshot_net)  # restored bit for bit, no error raised
    for restored, saved in zip(_state_copy(opt), snapshot_state):
        for key in saved:
            assert torch.equal(restored[key], saved[key]), key
    stats = safeopt.stats(opt)
    assert stats["recoveries"] == 1 and stats["consecutive_skips"] == 0
    assert stats["last_recovery"] == {"at": 8, "restored_to": 4, "cause": [STREAK]}
    assert stats["rolled_back"] == 4 and stats["skips"] == 3
    for batch in data[9:14]:
        _step(net, opt, batch)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_the_learning_rate_backs_off_and_comes_back() -> None:
    data = batches(20)
    net, opt = _wrapped(False, "host", max_consecutive_skips=1)
    lrs: list[float] = []
    seen = []
    opt.inner.register_step_pre_hook(lambda inner, *_: seen.append(inner.param_groups[0]["lr"]))
    for i, batch in enumerate(data[:10]):
        _step(net, opt, batch, nan=i == 2)  # update 2 recovers (back to update 0)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1e-2] * 10  # schedulers see their own value between steps
    # applied updates 0, 1, then 3.. with factors 0.25 + 0.75 * min((t - 2) / 4, 1)
    want = [1e-2, 1e-2] + [1e-2 * (0.25 + 0.75 * min((t - 2) / 4, 1)) for t in range(3, 10)]
    assert seen == pytest.approx(want, rel=1e-6)


def test_a_poisoned_weight_is_restored_and_recoveries_run_out_with_a_named_error() -> None:
    data = batches(30)
    net, opt = _wrapped(True, "host", max_recoveries=2)
    for batch in data[:5]:
        _step(net, opt, batch)
    for round_ in range(3):
        with torch.no_grad():
            next(net.parameters())[0, 0] = math.inf  # a poisoned weight
        if round_ < 2:
            _step(net, opt, data[5 + round_])  # seen at once (monitor_every=1): restored
            assert all(torch.isfinite(p).all() for p in net.parameters())
            assert safeopt.stats(opt)["recoveries"] == round_ + 1
        else:
            with pytest.raises(safeopt.DivergenceError, match="after 2 recoveries") as err:
                _step(net, opt, data[5 + round_])
            message = str(err.value)
            assert "max_recoveries=2" in message and "went back to update" in message
            assert "the weights went NaN/Inf" in message  # what fired
            diagnosis = str(err.value.diagnosis)
            assert "Recovered 2 times from a snapshot" in diagnosis
            assert "with no recovery left" in diagnosis and "the weights went NaN/Inf" in diagnosis


def test_on_an_accelerator_the_restore_comes_lag_updates_late_and_rolls_those_back() -> None:
    data = batches(20)
    net, opt = _wrapped(True, "device")
    opt._run.watch = StreakWatch(lag=2, event=SlowEvent)
    for batch in data[:4]:
        _step(net, opt, batch)
    snapshot_net = model()
    snapshot_net.load_state_dict(net.state_dict())  # the state before update 4
    for i, batch in enumerate(data[4:11], 4):
        _step(net, opt, batch, nan=i in (6, 7, 8))  # the streak reaches the limit at 8
    stats = safeopt.stats(opt)  # read at update 10, 2 updates late: 9 and 10 rolled back too
    assert stats["recoveries"] == 1
    assert stats["last_recovery"] == {"at": 10, "restored_to": 4, "cause": [STREAK]}
    assert_same_params(net, snapshot_net)


def test_skip_after_recovery_drops_the_batches_after_each_restore() -> None:
    data = batches(20)
    net, opt = _wrapped(False, "host", max_consecutive_skips=1)
    used = []
    for index, batch in safeopt.skip_after_recovery(iter(enumerate(data)), opt, skip=3):
        used.append(index)
        _step(net, opt, batch, nan=index == 5)  # recovers at once (limit 1)
    assert used == [0, 1, 2, 3, 4, 5, 9, *range(10, 20)]
    assert safeopt.stats(opt)["recoveries"] == 1


def test_telemetry_records_what_fired_and_what_was_rolled_back() -> None:
    data = batches(12)
    net, opt = _wrapped(False, "host", log_every=1)
    records: list[dict] = []

    class Sink:
        def write(self, record: dict) -> None:
            records.append(record)

    sink = safeopt.telemetry.add_sink(Sink())
    try:
        for i, batch in enumerate(data[:10]):
            _step(net, opt, batch, nan=i in (5, 6, 7))  # the streak reaches 3 at update 7
    finally:
        safeopt.telemetry.remove_sink(sink)
    assert [r["recoveries"] for r in records] == [0] * 7 + [1] * 3
    assert records[7]["last_recovery"] == {"at": 7, "restored_to": 4, "cause": [STREAK]}
    assert records[7]["rolled_back"] == 3 and records[6]["last_recovery"] is None


def test_snapshots_reuse_their_host_buffers_and_stay_exact() -> None:
    data = batches(14)
    net, opt = _wrapped(False, "host", snapshot_every=2)
    recovery = opt._run.recovery
    pointers = []
    for batch in data[:10]:  # updates 0-9: snapshots before updates 0, 2, 4, 6, 8
        _step(net, opt, batch)
        assert recovery.held is not None
        pointers.append(recovery.held[0][0][0].data_ptr())
    # host decisions: a new snapshot is known good before it is taken, so it is
    # written over the old one's buffers
    assert len(set(pointers)) == 1
    expected = [p.detach().clone() for p in net.parameters()]  # the snapshot before update 10
    _step(net, opt, data[10])
    for batch in data[11:14]:
        _step(net, opt, batch, nan=True)  # a streak of 3 restores it
    assert safeopt.stats(opt)["last_recovery"]["restored_to"] == 10
    for p, want in zip(net.parameters(), expected):
        assert torch.equal(p, want)


def test_the_recovery_cost_benchmark_runs() -> None:
    from safeopt_bench import recovery_cost

    out = recovery_cost.main(["--params", "2000", "--tensors", "4", "--rounds", "1"])
    assert set(out) == {"bare", "safeopt", "recover", "snapshot every step",
                        "restore every step"}
