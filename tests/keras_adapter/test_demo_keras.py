"""Smoke test of ``safeopt demo --framework keras`` on the current ``KERAS_BACKEND``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

keras = pytest.importorskip("keras")

from safeopt.cli import main  # noqa: E402

#: Upper limits of the wrapped runs' final loss after 30 steps (seed 0 reaches 11 and 0.22).
WRAPPED_LOSS_BELOW = {"mlp": 30.0, "rnn": 0.6}


def _loss(run: dict[str, Any]) -> float:
    return float(run["final_loss"])  # non-finite losses are written as "inf" / "nan"


def test_demo_runs_bare_and_wrapped_and_writes_files(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--framework", "keras", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "safeopt demo (keras)" in out and "| rnn | safeopt |" in out
    assert "diagnosis of rnn / bare" in out and "diagnosis of rnn / safeopt" in out
    # The variable paths reach the diagnosis: "rnn/.../recurrent_kernel" is recurrent.
    assert "Recurrent model" in out
    runs = {(r["task"], r["run"]): r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert set(runs) == {(t, a) for t in ("mlp", "rnn") for a in ("bare", "safeopt")}
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
    lines = (tmp_path / "keras_rnn_safeopt.jsonl").read_text().splitlines()
    assert len(lines) == 30
    record = json.loads(lines[-1])
    assert record["step"] == 30 and record["path"].startswith(keras.backend.backend())
    assert math.isfinite(record["grad_norm"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "keras_rnn.png").stat().st_size > 10_000  # bare and wrapped, side by side
