"""What every framework's ``safeopt demo`` smoke test checks (imported by those tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: Upper limits of the wrapped runs' final loss after 30 steps (seed 0 reaches 11 and 0.22).
WRAPPED_LOSS_BELOW = {"mlp": 30.0, "rnn": 0.6}


def _loss(run: dict[str, Any]) -> float:
    return float(run["final_loss"])  # non-finite losses are written as "inf" / "nan"


def check_demo(out: str, out_dir: Path, framework: str) -> dict[str, Any]:
    """Asserts what a 30-step demo must show; returns the last telemetry record of rnn/safeopt."""
    assert "| rnn | safeopt |" in out
    assert "diagnosis of rnn / bare" in out and "diagnosis of rnn / safeopt" in out
    runs = {(r["task"], r["run"]): r for r in json.loads((out_dir / "summary.json").read_text())}
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
    lines = (out_dir / f"{framework}_rnn_safeopt.jsonl").read_text().splitlines()
    assert len(lines) == 30
    record: dict[str, Any] = json.loads(lines[-1])
    assert record["step"] == 30 and math.isfinite(record["grad_norm"])
    return record


def check_report_png(out_dir: Path, framework: str) -> None:
    """The rnn report (bare and wrapped, side by side) was drawn."""
    assert (out_dir / f"{framework}_rnn.png").stat().st_size > 10_000
