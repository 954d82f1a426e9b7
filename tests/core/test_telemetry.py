"""Telemetry: throttling, records and the JSON Lines / logging / TensorBoard sinks."""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

import numpy as np
import pytest

import safeopt
import safeopt.adapter as sa
from safeopt import Policy, telemetry
from safeopt.adapter import GradStats, decide, init_state

xp = sa.namespace_by_name("numpy")
NAMES = ["enc.weight", "enc.bias", "dec.weight"]


class FakeWrapped:
    """Stands for a wrapped optimizer: a policy and a NumPy state the registry reads."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = init_state(xp, policy, n_tensors=len(NAMES))
        self.reads = 0

    def step(self, norms: list[float], loss: float) -> None:
        tn = np.asarray(norms, np.float32)
        stats = GradStats(norm=np.float32(np.sqrt((tn ** 2).sum())), loss=np.float32(loss),
                          tensor_norms=tn)
        _, self.state = decide(xp, self.policy, self.state, stats)


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_state(obj: Any) -> tuple[Policy, Any, dict[str, Any]]:
        obj.reads += 1
        return obj.policy, obj.state, {"names": NAMES, "path": "numpy", "framework": "fake"}

    monkeypatch.setattr(safeopt._record, "read_state", read_state)


@pytest.fixture
def sink() -> Any:
    records: list[dict[str, Any]] = []

    class Collect:
        def write(self, record: dict[str, Any]) -> None:
            records.append(record)

    collect = safeopt.add_sink(Collect())
    yield records
    telemetry.remove_sink(collect)
    telemetry.close_sinks()


def test_log_every_zero_by_default_records_nothing_and_reads_nothing(fake_registry, sink) -> None:
    opt = FakeWrapped(Policy())
    assert Policy().log_every == 0
    for step in range(1, 20):
        opt.step([0.1, 0.2, 0.3], 1.0)
        assert safeopt.after_step(opt, step) is None
    assert opt.reads == 0 and sink == []


def test_one_read_per_interval_and_record_fields(fake_registry, sink) -> None:
    opt = FakeWrapped(Policy(log_every=5, clip_norm=0.5, log_top_k=2))
    for step in range(1, 21):
        opt.step([0.1, 2.0 if step % 2 else 0.3, 0.3], 3.0 / step)
        safeopt.after_step(opt, step)
    assert opt.reads == 4 and [r["step"] for r in sink] == [5, 10, 15, 20]
    last = sink[-1]
    for key in ("step", "grad_norm", "scale", "clipped", "skipped", "threshold", "weight_norm",
                "loss", "layers", "skips", "norm_clips", "signs", "diagnosis"):
        assert key in last
    assert last["loss"] == pytest.approx(3.0 / 20)
    assert last["threshold"] == pytest.approx(0.5)
    assert last["applied"] == 20 and last["skips"] == 0
    assert list(last["layers"]) == ["enc.bias", "dec.weight"]  # top-2 by gradient-norm EMA
    assert last["weight_norm"] is None  # NaN (never gathered) becomes null
    json.dumps(last, allow_nan=False)


def test_records_flag_skips_and_divergence_raises_at_the_interval(fake_registry, sink) -> None:
    opt = FakeWrapped(Policy(log_every=2, max_consecutive_skips=3))
    opt.step([0.1, 0.1, 0.1], 1.0)
    safeopt.after_step(opt, 1)
    opt.step([math.nan, 0.1, 0.1], 1.0)
    rec = safeopt.after_step(opt, 2)
    assert rec is not None and rec["skipped"] and rec["signs"] == ["a"]
    opt.step([math.nan, 0.1, 0.1], 1.0)
    opt.step([math.nan, 0.1, 0.1], 1.0)
    with pytest.raises(safeopt.DivergenceError) as info:
        safeopt.after_step(opt, 4)
    assert info.value.diagnosis is None or info.value.diagnosis.fired("a")


def test_jsonl_file_sink_from_the_policy(fake_registry, tmp_path) -> None:
    path = tmp_path / "logs" / "run.jsonl"
    opt = FakeWrapped(Policy(log_every=3, log_file=str(path)))
    for step in range(1, 10):
        opt.step([0.5, 0.5, 0.5], 1.0 / step)
        safeopt.after_step(opt, step)
    telemetry.close_sinks()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6, 9]


def test_logging_sink_from_the_policy(fake_registry, caplog) -> None:
    opt = FakeWrapped(Policy(log_every=1, log_logger="safeopt.test"))
    opt.step([0.5, 0.5, 0.5], 0.25)
    with caplog.at_level(logging.INFO, logger="safeopt.test"):
        safeopt.after_step(opt, 1)
    telemetry.close_sinks()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("safeopt step 1:") and "loss=0.25" in message
    assert caplog.records[0].safeopt["step"] == 1


def test_tensorboard_sink_with_a_given_writer() -> None:
    calls: list[tuple[str, float, int]] = []

    class Writer:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append((tag, value, step))

    sink = telemetry.TensorBoardSink(writer=Writer())
    sink.write({"step": 7, "grad_norm": 2.0, "loss": None, "layers": {"a": 1.5}})
    assert ("safeopt/grad_norm", 2.0, 7) in calls
    assert ("safeopt/layer_grad_norm/a", 1.5, 7) in calls
    assert not any(tag == "safeopt/loss" for tag, _, _ in calls)


def test_tensorboard_event_files(tmp_path) -> None:
    pytest.importorskip("tensorboard")  # reads the events
    pytest.importorskip("tensorboardX")  # writes them
    sink = telemetry.TensorBoardSink(tmp_path)
    sink.write({"step": 1, "grad_norm": 2.0, "layers": {}})
    sink.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("safeopt/grad_norm")] == [2.0]


def test_add_sink_rejects_objects_without_write() -> None:
    with pytest.raises(TypeError, match="write"):
        safeopt.add_sink(object())  # type: ignore[arg-type]


def test_policy_validates_log_keys() -> None:
    with pytest.raises(safeopt.PolicyError, match="log_file"):
        Policy(log_file=3)
    with pytest.raises(safeopt.PolicyError, match="log_top_k"):
        Policy(log_top_k=0)
    assert Policy(log_tensorboard=False).log_tensorboard is None


def test_telemetry_imports_no_framework() -> None:
    import subprocess

    code = ("import sys, safeopt, safeopt.telemetry, safeopt._report, safeopt.cli; "
            "bad = {'torch', 'jax', 'tensorflow', 'keras', 'optax', 'matplotlib'} & "
            "set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
