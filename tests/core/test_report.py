"""``safeopt report``: PNG and HTML from JSON Lines run logs, one run or several side by side."""

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


def write_log(path: Path, steps: int = 120, policy: Policy | None = None,
              nan: range = range(80, 90), growth: float = 1.04) -> None:
    """A run that clips, then goes NaN for a while: NumPy decide + records."""
    policy = policy or Policy(clip_norm=2.0, log_every=5, max_consecutive_skips=None)
    names = [f"layer{i}.weight" for i in range(6)]
    state = init_state(xp, policy, n_tensors=len(names))
    rng = np.random.default_rng(0)
    sink = telemetry.JsonlSink(path, mode="w")
    for step in range(1, steps + 1):
        tn = (np.abs(rng.normal(1.0, 0.3, len(names))) * growth ** step * np.linspace(0.2, 2, 6))
        tn = tn.astype(np.float32)
        if step in nan:
            tn[2] = np.nan
        loss = np.float32(1.0 / step + 0.05 * rng.random())
        with np.errstate(invalid="ignore"):
            stats = GradStats(norm=np.float32(np.sqrt(np.sum(tn ** 2))), loss=loss,
                              tensor_norms=tn, weight_norm=np.float32(10 * 1.01 ** step)
                              if step % 10 == 0 else None)
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


def _null_log(path: Path) -> None:
    """Records with null (a NaN/Inf the writer could not store) in every numeric field."""
    records = []
    for step in range(1, 31):
        bad = step >= 20
        records.append({
            "step": step, "updates": step, "applied": step, "skips": 0, "nonfinite": 0 if
            step < 20 else step - 19, "norm_clips": None, "loss": None if bad else 1.0 / step,
            "grad_norm": None if bad else 2.0 * step, "threshold": None, "weight_norm": None,
            "layers": {"a.weight": None if bad else float(step), "b.weight": 0.5},
            "signs": ["a"] if bad else [],
            "diagnosis": {"updates": step, "applied": step, "skipped": 0, "window": None,
                          "signs": [{"key": "nonfinite", "letter": "a", "title": "NaN",
                                     "since": 19, "last": None, "count": None,
                                     "active": True, "evidence": None, "data": None}]
                          if bad else [],
                          "layers": [{"name": "a.weight", "index": 0, "norm": None,
                                      "over_fraction": None, "since": None, "growth": None}]
                          if bad else []}})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_report_reads_null_anywhere(tmp_path, capsys) -> None:
    log = tmp_path / "nulls.jsonl"
    _null_log(log)
    assert main(["report", str(log), "--html"]) == 0
    out = capsys.readouterr().out
    assert "exploding gradients" in out and "norm ~nan" in out
    assert (tmp_path / "nulls.png").stat().st_size > 10_000
    assert "norm ~nan" in (tmp_path / "nulls.html").read_text()


def test_report_reads_nan_and_infinity_tokens(tmp_path, capsys) -> None:
    log = tmp_path / "tokens.jsonl"
    lines = [f'{{"step": {s}, "loss": {v}, "grad_norm": Infinity, "layers": {{"w": NaN}}}}'
             for s, v in ((1, "1.0"), (2, "NaN"), (3, "-Infinity"))]
    log.write_text("\n".join([*lines, '{"step": null}', '{"step": NaN}']) + "\n")
    assert main(["report", str(log)]) == 0
    assert "No diagnosis recorded" in capsys.readouterr().out


def test_two_runs_side_by_side_on_shared_axes(tmp_path, capsys) -> None:
    bare, wrapped = tmp_path / "bare.jsonl", tmp_path / "wrapped.jsonl"
    write_log(bare, steps=60, growth=1.3, policy=Policy(clip_norm=None, log_every=1,
                                                       skip_nonfinite=False,
                                                       max_consecutive_skips=None),
              nan=range(50, 61))
    write_log(wrapped, steps=120, growth=1.0)
    assert main(["report", str(bare), str(wrapped), "--html"]) == 0
    out = capsys.readouterr().out
    assert "== bare.jsonl (60 records) ==" in out and "== wrapped.jsonl (24 records) ==" in out
    png = tmp_path / "bare_vs_wrapped.png"
    assert (tmp_path / "bare_vs_wrapped.html").is_file()
    width, _ = png_size(png)
    assert width > 1200


def _figure(runs, total=None):
    from safeopt._report_plot import figure

    return figure(runs, "t", total)


def test_picture_marks_nan_and_stop_and_keeps_the_colour_bar_beside_the_heat_map() -> None:
    import matplotlib.pyplot as plt

    from safeopt._report_data import Run

    records = [{"step": s, "loss": 1.0 / s if s < 20 else None, "nonfinite": max(s - 19, 0),
                "grad_norm": float(s), "layers": {"a": float(s) if s < 20 else None,
                                                  "b": 1.0 if s % 2 else None}}
               for s in range(1, 26)]
    wrapped = [{"step": s, "loss": 1.0, "grad_norm": 2.0, "threshold": 1.0, "norm_clips": s,
                "layers": {"a": 2.0}} for s in range(1, 41)]
    fig = _figure([Run("bare", records, "exploding"), Run("safeopt", wrapped, "healthy", 1.0)],
                  total=40)
    try:
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert "stopped at step 25" in texts
        assert any("NaN/Inf from step 20" in t for t in texts)
        titles = [ax.get_title() for ax in fig.axes]
        assert "bare: exploding" in titles
        assert "safeopt: healthy (100% of updates clipped)" in titles
        # 4 rows x 2 columns (added row by row), plus one colour bar beside the heat maps.
        assert len(fig.axes) == 9
        heat, cbar = fig.axes[7], fig.axes[8]
        fig.canvas.draw()
        assert cbar.get_position().x0 > heat.get_position().x1
        assert cbar.get_position().y1 <= heat.get_position().y1 + 0.01
        assert cbar.get_position().y0 >= heat.get_position().y0 - 0.01
        assert fig.axes[1].get_position().x1 >= heat.get_position().x1 - 0.01
        # All columns share the step axis (up to the steps asked for) and the value axes.
        assert fig.axes[0].get_xlim() == fig.axes[7].get_xlim() == (0.5, 40.5)
        assert fig.axes[2].get_ylim() == fig.axes[3].get_ylim()
        # NaN cells (a listed as null) are coloured apart from blank ones (b not listed).
        legend = [t.get_text() for t in heat.get_legend().get_texts()]
        assert "NaN/Inf" in legend and any(t.startswith("blank") for t in legend)
    finally:
        plt.close(fig)


def test_layer_matrix_tells_blank_from_nan() -> None:
    from safeopt._report import layer_matrix

    records = [{"step": 1, "layers": {"a": 2.0, "b": 0.5}},
               {"step": 2, "layers": {"b": 3.0, "c": None}}]
    names, grid = layer_matrix(records)
    assert names == ["b", "a", "c"]
    assert grid[0].tolist() == [0.5, 3.0]
    assert math.isnan(grid[1, 1])  # a is not in record 2's top-k: blank
    assert math.isnan(grid[2, 0]) and grid[2, 1] == math.inf  # c listed as null: NaN/Inf


def test_nonfinite_records_and_increments() -> None:
    from safeopt._report_data import increments, nonfinite

    records = [{"step": 1, "loss": None, "grad_norm": 1.0, "skips": 0},
               {"step": 2, "loss": None, "grad_norm": 1.0, "skips": None},
               {"step": 3, "loss": None, "grad_norm": None, "skips": 2},
               {"step": 4, "loss": None, "grad_norm": 1.0, "skips": 2, "nonfinite": 1}]
    assert nonfinite(records).tolist() == [False, False, True, True]  # no loss is not NaN
    assert increments(records, "skips").tolist() == [False, False, True, False]


def test_short_names_keep_the_informative_end_and_stay_unique() -> None:
    from safeopt._report_data import short_names

    names = ["sequential/simple_rnn/simple_rnn_cell/recurrent_kernel",
             "sequential/simple_rnn/simple_rnn_cell/kernel", "sequential/dense/kernel",
             "sequential/dense_1/kernel", "dense00/kernel", "x" * 60]
    short = short_names(names)
    assert short[:5] == [".../simple_rnn_cell/recurrent_kernel", ".../simple_rnn_cell/kernel",
                         "sequential/dense/kernel", "sequential/dense_1/kernel", "dense00/kernel"]
    assert len(short[5]) <= 31 and "..." in short[5]
    twins = ["encoder/block/attention/query/kernel", "decoder/block/attention/query/kernel"]
    assert short_names(twins) == twins  # no tail tells them apart: kept whole
    # The model's name in front of every Keras variable goes.
    keras = short_names(["model/out/kernel", "model/out/bias",
                         "model/rnn/simple_rnn_cell/recurrent_kernel"])
    assert keras == ["out/kernel", "out/bias", ".../simple_rnn_cell/recurrent_kernel"]


def test_report_errors_are_clear(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"hello": 1}) + "\n")
    assert main(["report", str(empty)]) == 2
    out = capsys.readouterr().out
    assert "must be an existing file" in out and "log_every" in out
