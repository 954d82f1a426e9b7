"""``safeopt report``: PNG and HTML from a JSON Lines run log."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

import safeopt.adapter as sa
from safeopt import Policy, telemetry
from safeopt.adapter import GradStats, decide, init_state
from safeopt.cli import main

pytest.importorskip("matplotlib")
xp = sa.namespace_by_name("numpy")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def write_log(path: Path, steps: int = 120) -> None:
    """A run that clips, then goes NaN for a while: NumPy decide + records."""
    policy = Policy(clip_norm=2.0, log_every=5, max_consecutive_skips=None)
    names = [f"layer{i}.weight" for i in range(6)]
    state = init_state(xp, policy, n_tensors=len(names))
    rng = np.random.default_rng(0)
    sink = telemetry.JsonlSink(path, mode="w")
    for step in range(1, steps + 1):
        growth = 1.04 ** step
        tn = (np.abs(rng.normal(1.0, 0.3, len(names))) * growth * np.linspace(0.2, 2, 6))
        tn = tn.astype(np.float32)
        if 80 <= step < 90:
            tn[2] = np.nan
        loss = np.float32(1.0 / step + 0.05 * rng.random())
        stats = GradStats(norm=np.float32(np.sqrt(np.nansum(tn ** 2)) if not np.isnan(tn).any()
                                          else np.nan),
                          loss=loss, tensor_norms=tn,
                          weight_norm=np.float32(10 * 1.01 ** step) if step % 10 == 0 else None)
        _, state = decide(xp, policy, state, stats)
        if sa.telemetry_due(policy, step):
            sink.write(sa.make_record(policy, state, {"names": names}, step=step))
    sink.close()


def test_report_writes_png_and_prints_diagnosis(tmp_path, capsys) -> None:
    log = tmp_path / "run.jsonl"
    write_log(log)
    assert main(["report", str(log)]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "run.png"
    assert png.is_file() and png.stat().st_size > 20_000
    width, height = png_size(png)
    assert width >= 800 and height >= 800
    assert "safeopt diagnosis after 120 updates" in out and "(a)" in out
    assert f"wrote {png}" in out


def test_report_html_is_self_contained(tmp_path, capsys) -> None:
    log = tmp_path / "run.jsonl"
    write_log(log, steps=40)
    out_png = tmp_path / "pics" / "r.png"
    page = tmp_path / "r.html"
    assert main(["report", str(log), "-o", str(out_png), "--html", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Diagnosis" in text
    assert "src=\"http" not in text and "<script" not in text
    payload = text.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(payload) == out_png.read_bytes()


def test_layer_matrix_and_increments_from_records() -> None:
    from safeopt._report import layer_matrix

    records = [{"step": 1, "layers": {"a": 2.0, "b": 0.5}},
               {"step": 2, "layers": {"b": 3.0, "c": 0.1}}]
    names, grid = layer_matrix(records)
    assert names == ["b", "a", "c"]
    assert grid[0].tolist() == [0.5, 3.0]
    assert math.isnan(grid[1, 1]) and grid[2, 1] == pytest.approx(0.1)


def test_report_errors_are_clear(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"hello": 1}) + "\n")
    assert main(["report", str(empty)]) == 2
    out = capsys.readouterr().out
    assert "must be an existing file" in out and "log_every" in out
