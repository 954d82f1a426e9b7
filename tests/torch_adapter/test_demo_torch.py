"""Smoke tests of ``safeopt demo`` and ``safeopt bench`` in PyTorch (short runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from safeopt.cli import main

#: Upper limits of the wrapped runs' final loss after 30 steps (seed 0 reaches 11 and 0.22).
WRAPPED_LOSS_BELOW = {"mlp": 30.0, "rnn": 0.6}


def _loss(run: dict[str, Any]) -> float:
    return float(run["final_loss"])  # non-finite losses are written as "inf" / "nan"


def test_demo_runs_bare_and_wrapped_and_writes_files(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--framework", "torch", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mlp | bare |" in out and "| rnn | safeopt |" in out
    assert "diagnosis of rnn / bare" in out and "diagnosis of rnn / safeopt" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = {(r["task"], r["run"]): r for r in summary}
    assert set(runs) == {("mlp", "bare"), ("mlp", "safeopt"), ("rnn", "bare"),
                         ("rnn", "safeopt")}
    for task in ("mlp", "rnn"):
        bare, wrapped = runs[(task, "bare")], runs[(task, "safeopt")]
        # The bare runs overflow early, by construction (safeopt._demo_numpy):
        # the MLP from step 4-6, the RNN from step 7-10 on every backend.
        assert bare["first_nan_step"] is not None and bare["first_nan_step"] <= 20, (task, bare)
        # Both wrapped runs stay finite, clipping, ...
        assert wrapped["nan_steps"] == 0 and math.isfinite(_loss(wrapped))
        assert wrapped["clipped"] > 0 and wrapped["skipped"] == 0
        # ... and learn (MLP ~11 from ~70; RNN ~0.25 from ~1.2; limits x2.5).
        assert _loss(wrapped) < WRAPPED_LOSS_BELOW[task], (task, wrapped)
        assert not _loss(bare) < 1000 * _loss(wrapped), (task, bare, wrapped)
        # NaN steps are counted among the steps that ran, never the ones a stop skipped
        assert bare["nan_steps"] <= bare["steps_run"] <= bare["steps"]
    assert "Files go to" in out and out.count("| diverged |") == 2  # both bare runs
    lines = (tmp_path / "torch_rnn_safeopt.jsonl").read_text().splitlines()
    assert len(lines) == 30
    record = json.loads(lines[-1])
    assert record["step"] == 30 and "grad_norm" in record and "layers" in record
    pytest.importorskip("matplotlib")
    assert (tmp_path / "torch_rnn.png").stat().st_size > 10_000  # bare and wrapped, side by side


def test_bench_quick_writes_json_and_table(tmp_path: Path) -> None:
    args = ["bench", "--quick", "--out", str(tmp_path), "--params", "20000", "--tensors", "4",
            "16", "--rounds", "2"]
    assert main(args) == 0
    data = json.loads((tmp_path / "overhead.json").read_text())
    lines = {(s["framework"], s["tensors"]): s for s in data["summary"]}
    assert set(lines) == {("torch", 4), ("torch", 16)}
    assert all(s["safeopt_x_bare"] > 0 and "clip_grad_norm_+step" in s["vs"]
               for s in lines.values())
    assert "| torch | cpu | 0.02M | 4 |" in (tmp_path / "overhead.md").read_text()


def test_stability_quick_reports_every_configuration(tmp_path: Path) -> None:
    args = ["bench", "--stability", "--quick", "--out", str(tmp_path), "--seeds", "1",
            "--steps", "30", "--lengths", "20"]
    assert main(args) == 0
    data = json.loads((tmp_path / "stability.json").read_text())
    configs = {s["config"] for s in data["summary"]}
    assert {"none", "clip_grad_norm_(1.0)", "safeopt default", "safeopt zscore"} <= configs
    by = {(s["task"], s["config"]): s for s in data["summary"]}
    # Bare SGD on the addition problem with spectral radius 1.5 goes NaN ...
    assert by[("addition", "none")]["nan_runs"] == 1
    # ... while safeopt keeps it finite.
    assert by[("addition", "safeopt default")]["nan_runs"] == 0
    assert math.isfinite(by[("addition", "safeopt default")]["median_loss"])
    assert "| addition | 20 | safeopt default |" in (tmp_path / "stability.md").read_text()


def test_overhead_decomposition_runs_every_part() -> None:
    from safeopt_bench import overhead_torch

    parts = overhead_torch.decompose(total=20_000, n_tensors=4, rounds=2, warmup=1)
    assert set(parts) == {"bare", "read+step", "norm+step", "safeopt, no clip",
                          "safeopt, clipping"}
    assert parts["bare"] == 1.0 and all(v > 0 for v in parts.values())
