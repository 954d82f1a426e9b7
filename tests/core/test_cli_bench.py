"""The ``demo`` and ``bench`` commands without a framework: parsing, tables, ratios."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest

from safeopt.cli import build_parser
from safeopt_bench import overhead, stability
from safeopt_bench.demo import ProgressBar


def test_help_lists_demo_and_bench_without_importing_a_framework() -> None:
    code = ("import sys; from safeopt.cli import main\n"
            "for cmd in (['demo', '--help'], ['bench', '--help']):\n"
            "    try: main(cmd)\n"
            "    except SystemExit: pass\n"
            "assert not {'torch','jax','tensorflow','keras','optax'} & set(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--framework" in done.stdout and "--stability" in done.stdout
    assert "--steps" not in done.stdout  # hidden smoke-test knob


def test_bench_defaults_are_the_real_ones() -> None:
    args = build_parser().parse_args(["bench"])
    assert overhead.settings_from(args)["sizes"] == (1_000_000, 10_000_000, 50_000_000)
    assert overhead.settings_from(args)["tensors"] == (10, 200, 1000)
    quick = overhead.settings_from(build_parser().parse_args(["bench", "--quick"]))
    assert quick["frameworks"] == ("torch",) and quick["tensors"] == (10, 1000)
    full = stability.settings_from(build_parser().parse_args(["bench", "--stability"]))
    assert full["lengths"] == (50, 100, 200)


def _rows() -> list[dict[str, object]]:
    base = {"framework": "torch", "device": "cpu", "params": 10_000_000}
    ms = {10: {"bare": 10.0, "safeopt": 11.0, "clip_grad_norm_+step": 17.0},
          1000: {"bare": 20.0, "safeopt": 26.0, "clip_grad_norm_+step": 30.0}}
    return [{**base, "tensors": n, "candidate": c, "median_ms": v}
            for n, cands in ms.items() for c, v in cands.items()]


def test_overhead_ratios_and_growth() -> None:
    summary = overhead.summarize(_rows())
    by = {s["tensors"]: s for s in summary}
    assert by[10]["safeopt_x_bare"] == pytest.approx(1.1)
    assert by[10]["vs"]["clip_grad_norm_+step"]["safeopt_over"] == pytest.approx(11 / 17)
    assert by[1000]["vs"]["clip_grad_norm_+step"]["x_bare"] == pytest.approx(1.5)
    (grow,) = overhead.growth(summary)
    assert grow["growth"] == pytest.approx(1.3 / 1.1)
    table = overhead.markdown(summary)
    assert "| torch | cpu | 10M | 10 | 10.00 | 1.100x | clip_grad_norm_+step | 1.700x | 0.647x |" \
        in table


def test_stability_summary_counts_success_and_nan() -> None:
    runs = [{"task": "addition", "length": 50, "config": c, "seed": s, "final_loss": loss,
             "error_rate": err, "success": err < 0.01, "first_nan_step": nan}
            for c, s, loss, err, nan in [("none", 0, math.nan, 1.0, 3), ("none", 1, 0.2, 0.5, None),
                                         ("clip", 0, 0.01, 0.0, None),
                                         ("clip", 1, 0.03, 0.02, None)]]
    by = {s["config"]: s for s in stability.summarize(runs)}
    assert by["none"]["nan_runs"] == 1 and math.isnan(by["none"]["median_loss"])
    assert by["clip"]["success"] == 1 and by["clip"]["median_loss"] == pytest.approx(0.02)
    assert "| addition | 50 | none | 0/2 | 1/2 | NaN/Inf |" in stability.markdown(
        stability.summarize(runs))


def test_progress_bar_without_a_terminal_prints_few_lines() -> None:
    stream = io.StringIO()
    bar = ProgressBar("run", 100, stream)
    for i in range(1, 101):
        bar.update(i, 1.0 / i)
    bar.close(100, 0.01, "done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[-1].startswith("run |" + "#" * 24 + "| 100/100 train loss 0.01")
    assert "done" in lines[-1]
