"""Smoke test of ``safeopt demo --framework jax`` (short runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from safeopt.cli import main


def _loss(run: dict[str, Any]) -> float:
    return float(run["final_loss"])  # non-finite losses are written as "inf" / "nan"


def test_demo_runs_bare_and_wrapped_and_writes_files(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--framework", "jax", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "safeopt demo (jax)" in out and "| rnn | safeopt |" in out
    assert "diagnosis of rnn / bare" in out and "diagnosis of rnn / safeopt" in out
    # The parameter names reach the diagnosis: "['rnn']['w_hh']" is recurrent.
    assert "Recurrent model" in out
    runs = {(r["task"], r["run"]): r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert set(runs) == {(t, a) for t in ("mlp", "rnn") for a in ("bare", "safeopt")}
    # The RNN goes NaN within 30 steps when bare (from about step 24) ...
    assert runs[("rnn", "bare")]["nan_steps"] > 0
    for task in ("mlp", "rnn"):
        bare, wrapped = runs[(task, "bare")], runs[(task, "safeopt")]
        # ... both wrapped runs stay finite, clipping, ...
        assert wrapped["nan_steps"] == 0 and math.isfinite(_loss(wrapped))
        assert wrapped["clipped"] > 0 and wrapped["skipped"] == 0
        # ... and end far below the bare runs, which diverged.
        assert not _loss(bare) < 1000 * _loss(wrapped), (task, bare, wrapped)
    lines = (tmp_path / "jax_rnn_safeopt.jsonl").read_text().splitlines()
    assert len(lines) == 30
    record = json.loads(lines[-1])
    assert record["step"] == 30 and record["path"] == "jit" and math.isfinite(record["grad_norm"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "jax_rnn_safeopt.png").stat().st_size > 10_000
