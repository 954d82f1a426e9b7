"""Smoke test of ``safeopt demo --framework keras`` on the current ``KERAS_BACKEND``."""

from __future__ import annotations

from pathlib import Path

import pytest

keras = pytest.importorskip("keras")

from demo_checks import check_demo, check_report_png  # noqa: E402

from safeopt.cli import main  # noqa: E402


def test_demo_runs_bare_and_wrapped_and_writes_files(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--framework", "keras", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "safeopt demo (keras)" in out and "| rnn | safeopt |" in out
    assert "diagnosis of rnn / bare" in out and "diagnosis of rnn / safeopt" in out
    # The variable paths reach the diagnosis: "rnn/.../recurrent_kernel" is recurrent.
    assert "Recurrent model" in out
    record = check_demo(out, tmp_path, "keras")
    assert record["path"].startswith(keras.backend.backend())
    pytest.importorskip("matplotlib")
    check_report_png(tmp_path, "keras")
