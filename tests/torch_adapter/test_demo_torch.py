"""Smoke tests of ``safeopt demo`` and ``safeopt bench`` in PyTorch (short runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from demo_checks import check_demo, check_report_png

from safeopt.cli import main


def test_demo_runs_bare_and_wrapped_and_writes_files(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--framework", "torch", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mlp | bare |" in out and "| rnn | safeopt |" in out
    assert "diagnosis of rnn / bare" in out and "diagnosis of rnn / safeopt" in out
    record = check_demo(out, tmp_path, "torch")
    assert "layers" in record
    pytest.importorskip("matplotlib")
    check_report_png(tmp_path, "torch")


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
