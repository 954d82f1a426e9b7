"""Smoke test of ``safeopt demo --framework jax`` (short runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from demo_checks import check_demo, check_report_png

from safeopt.cli import main


def test_demo_runs_bare_and_wrapped_and_writes_files(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--framework", "jax", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "safeopt demo (jax)" in out and "| rnn | safeopt |" in out
    assert "diagnosis of rnn / bare" in out and "diagnosis of rnn / safeopt" in out
    # The parameter names reach the diagnosis: "['rnn']['w_hh']" is recurrent.
    assert "Recurrent model" in out
    record = check_demo(out, tmp_path, "jax")
    assert record["path"] == "jit"
    pytest.importorskip("matplotlib")
    check_report_png(tmp_path, "jax")
