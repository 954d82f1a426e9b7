"""The language-model stability benchmark: runs, loss spikes, tables and loss curves.

For each configuration of :func:`safeopt_bench.lm.configurations` (no
protection, ``clip_grad_norm_(1.0)``, ZClip, safeopt's default, adaptive
(ZClip's z-score), spike-skipping and, once safeopt has it, recovery
policies) and each seed, it trains the byte-level transformer of
:mod:`safeopt_bench.lm` on the standard library's source with the same
hyper-parameters, and reports per configuration: the runs that saw a NaN/Inf
loss or weights, the loss spikes, the final validation loss and the wall
time, and draws every run's training loss.

A loss spike follows ZClip (Kumar et al., 2025): the training loss of step
``t`` is a spike when it lies more than :data:`SPIKE_K` standard deviations
above the mean of the :data:`SPIKE_WINDOW` steps before it (the z-score of
the loss against its running statistics; the window is of the order of
ZClip's EMA, ``alpha = 0.97``, about 33 steps); consecutive spike steps count
as one spike. Over the runs of the learning-rate calibration (about 47,000
steps) this flagged 3 steps after step 40 where no spike is visible, and
missed some of the spikes of the first 20 steps, whose statistics the steep
initial descent inflates; a window of 50 steps missed more of them.

Run:
  safeopt bench --stability --tasks lm           # the LM part of the full benchmark
  python -m safeopt_bench.lm_report              # the same
  python -m safeopt_bench.lm_report --calibrate  # the learning-rate sweep (clip_grad_norm_)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPIKE_WINDOW = 20
"""Steps of the running mean and standard deviation a loss is compared with."""
SPIKE_K = 5.0
"""Standard deviations above the running mean that make a loss a spike."""
SPIKE_MIN_HISTORY = 10
"""Finite losses the statistics need before a loss can be a spike."""

FULL: dict[str, Any] = {"seeds": 3}
QUICK: dict[str, Any] = {"seeds": 1}
CALIBRATION_LRS = (3e-3, 1e-2, 2e-2, 4e-2, 8e-2)


# ---------------------------------------------------------------------------
# Loss spikes.
# ---------------------------------------------------------------------------
def spike_steps(losses: Sequence[float], window: int = SPIKE_WINDOW,
                k: float = SPIKE_K) -> list[int]:
    """Steps whose loss is more than ``k`` running standard deviations above the running mean.

    The statistics are the mean and population standard deviation of the
    finite losses among the ``window`` steps before (at least
    :data:`SPIKE_MIN_HISTORY` of them); non-finite losses are never spikes
    (they count as NaN).
    """
    out = []
    for t in range(len(losses)):
        past = [v for v in losses[max(t - window, 0):t] if math.isfinite(v)]
        if len(past) < SPIKE_MIN_HISTORY or not math.isfinite(losses[t]):
            continue
        mean = statistics.fmean(past)
        std = statistics.pstdev(past, mean)
        if losses[t] > mean + k * std:
            out.append(t)
    return out


def spike_onsets(steps: Sequence[int]) -> list[int]:
    """The first step of each run of consecutive spike steps."""
    return [s for i, s in enumerate(steps) if i == 0 or steps[i - 1] != s - 1]


# ---------------------------------------------------------------------------
# Runs and summary.
# ---------------------------------------------------------------------------
def rows(hyper: dict[str, Any], seeds: int, configs: Sequence[str] | None = None,
         log: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Runs every (configuration, seed); returns one row per run, with its spikes."""
    from safeopt_bench import lm, text

    corpus = text.load()
    names = list(configs) if configs is not None else list(lm.configurations())
    jobs = [(c, s) for c in names for s in range(seeds)]
    lm.warm_up(names, hyper, corpus)
    out = []
    sink = log.open("a", encoding="utf-8") if log is not None else None
    try:
        for i, (config, seed) in enumerate(jobs, 1):
            row = lm.run(config, seed, hyper, corpus)
            row["spike_steps"] = spike_steps(row["losses"])
            row["spikes"] = len(spike_onsets(row["spike_steps"]))
            out.append(row)
            if sink is not None:
                sink.write(json.dumps({**row, "lr": hyper["lr"]}) + "\n")
                sink.flush()
            if progress:
                print(f"[{i}/{len(jobs)}] lm {config} lr {hyper['lr']:g} seed {seed}: val "
                      f"{row['val_loss']:.4g}, {row['spikes']} spikes, NaN at "
                      f"{row['first_nan_step']}, {row['seconds']:.0f}s", file=sys.stderr,
                      flush=True)
    finally:
        if sink is not None:
            sink.close()
    return out


def summarize(table: Sequence[dict[str, Any]], key: str = "config") -> list[dict[str, Any]]:
    """One line per configuration (or per ``key``): NaN runs, spikes, validation loss, time."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in table:
        groups.setdefault(r[key], []).append(r)
    out = []
    for name, runs in groups.items():
        vals = [r["val_loss"] for r in runs]
        finite = [v for v in vals if math.isfinite(v)]
        skips = [r["safeopt"]["skips"] for r in runs if r.get("safeopt")]
        out.append({
            key: name, "runs": len(runs),
            "nan_runs": sum(r["first_nan_step"] is not None for r in runs),
            "stopped_runs": sum(r["stopped"] is not None for r in runs),
            "spikes": [r["spikes"] for r in runs],
            "runs_with_spikes": sum(r["spikes"] > 0 for r in runs),
            "median_val_loss": statistics.median(finite) if len(finite) == len(vals)
            else math.nan,
            "val_losses": vals,
            "skipped_updates": skips if skips else None,
            "median_seconds": statistics.median(r["seconds"] for r in runs),
        })
    return out


def markdown(summary: Sequence[dict[str, Any]], key: str = "config") -> str:
    """The summary as a Markdown table."""
    lines = [f"| {key} | runs with NaN | spikes per run | runs with spikes | median final val "
             "loss | final val loss per seed | skipped updates | median s per run |",
             "|---|---:|---|---:|---:|---|---|---:|"]
    for s in summary:
        name = s[key] if key == "config" else f"{s[key]:g}"
        lines.append(
            f"| {name} | {s['nan_runs']}/{s['runs']} | {', '.join(map(str, s['spikes']))} "
            f"| {s['runs_with_spikes']}/{s['runs']} | {_num(s['median_val_loss'])} "
            f"| {', '.join(_num(v) for v in s['val_losses'])} "
            f"| {', '.join(map(str, s['skipped_updates'])) if s['skipped_updates'] else '-'} "
            f"| {s['median_seconds']:.0f} |")
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "NaN"


# ---------------------------------------------------------------------------
# Curves.
# ---------------------------------------------------------------------------
_TOP = 6.0  # the curves' y limit (nats per byte; a uniform guess is ln 256 = 5.5)


def plot(table: Sequence[dict[str, Any]], path: Path, title: str,
         key: str = "config") -> Path | None:
    """Every run's training loss, one panel per configuration (or ``key``), spikes marked.

    Losses above the plot's top are cut there; spike markers are drawn at
    most at the top. Returns the PNG's path, or ``None`` when matplotlib is
    not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(dict.fromkeys(r[key] for r in table))
    cols = min(len(names), 4)
    rows_ = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.2 * rows_), sharex=True,
                             sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        for r in (r for r in table if r[key] == name):
            line, = ax.plot(r["losses"], lw=0.6, label=f"seed {r['seed']}")
            onsets = spike_onsets(r["spike_steps"])
            ax.plot(onsets, [min(r["losses"][s], _TOP - 0.15) for s in onsets], "o", ms=5,
                    mfc="none", color=line.get_color())
            if r["first_nan_step"] is not None:
                ax.axvline(r["first_nan_step"], color=line.get_color(), ls=":", lw=1)
        ax.set_title(name if key == "config" else f"{key} {name:g}", fontsize=9)
        ax.set_ylim(0.5, _TOP)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{title}\no: spike onset (loss > mean + {SPIKE_K:g} std of the previous "
                 f"{SPIKE_WINDOW} steps); dotted line: first NaN", fontsize=9)
    fig.supxlabel("step", fontsize=9)
    fig.supylabel("training loss (nats/byte)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------
def header(hyper: dict[str, Any], seeds: int, seconds: float, command: str) -> str:
    """Date, machine, command, settings, data and run time."""
    from safeopt_bench import lm, text

    corpus = text.load().describe()
    env = lm.environment()
    return (f"Measured {_dt.date.today().isoformat()} on {platform.machine()} "
            f"({platform.processor() or platform.platform()}), Python "
            f"{platform.python_version()}, torch {env['torch']}, {env['threads']}, with "
            f"`{command}`: {seeds} seeds, hyper-parameters {hyper}. Data: {len(corpus['files'])} "
            f"standard-library files, {corpus['bytes']} bytes (train {corpus['train_bytes']}, "
            f"val {corpus['val_bytes']}), sha256 {corpus['sha256'][:16]}. Spike: loss > mean + "
            f"{SPIKE_K:g} std of the previous {SPIKE_WINDOW} steps. Run time "
            f"{seconds / 60:.1f} min.")


def write(out_dir: Path, stem: str, table: Sequence[dict[str, Any]], hyper: dict[str, Any],
          seeds: int, seconds: float, command: str, key: str = "config",
          ) -> tuple[Path, Path, Path | None]:
    """Writes ``{stem}.md``, ``{stem}.json`` and ``{stem}.png``; returns their paths."""
    from safeopt_bench import text

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(table, key)
    md = out_dir / f"{stem}.md"
    md.write_text(header(hyper, seeds, seconds, command) + "\n\n" + markdown(summary, key)
                  + "\n", encoding="utf-8")
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps({
        "command": command, "seconds": seconds, "seeds": seeds, "hyper": hyper,
        "spike": {"window": SPIKE_WINDOW, "k": SPIKE_K}, "data": text.load().describe(),
        "summary": summary, "runs": list(table)}, indent=1, default=str), encoding="utf-8")
    png = plot(table, out_dir / f"{stem}.png", command, key)
    return md, js, png


def run(out_dir: Path, command: str, quick: bool = False, seeds: int | None = None,
        steps: int | None = None, calibrate: bool = False,
        lrs: Sequence[float] | None = None, episode: bool = False,
        ) -> tuple[Path, Path, Path | None]:
    """Runs the benchmark (or, with ``calibrate``, the learning-rate sweep) and writes its files.

    Args:
      out_dir: Directory of ``lm_stability.{md,json,png}`` and
        ``lm_stability_runs.jsonl`` (``lm_calibration.*`` when calibrating).
      command: The command line, for the report.
      quick: The tiny model of :data:`safeopt_bench.lm.QUICK` (CI).
      seeds: Seeds per configuration (default: 3, quick: 1).
      steps: Training steps per run (default: the model's).
      calibrate: Sweep the learning rate with ``clip_grad_norm_(1.0)``
        instead of comparing the configurations.
      lrs: The sweep's learning rates (default: :data:`CALIBRATION_LRS`).
      episode: Run the bad-data episode (:data:`safeopt_bench.lm.EPISODE`)
        instead, into ``lm_episode.*``.

    Returns:
      The paths of the Markdown table, the JSON and the PNG (``None``
      without matplotlib).
    """
    from safeopt_bench import lm

    if episode:
        hyper = dict(lm.QUICK_EPISODE if quick else lm.EPISODE)
    else:
        hyper = dict(lm.QUICK if quick else lm.HYPER)
    if steps:
        hyper["steps"] = steps
    seeds = seeds or (QUICK if quick else FULL)["seeds"]
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "lm_calibration" if calibrate else "lm_episode" if episode else "lm_stability"
    log = out_dir / f"{stem}_runs.jsonl"
    log.unlink(missing_ok=True)
    start = time.perf_counter()
    table: list[dict[str, Any]] = []
    if calibrate:
        for lr in lrs or CALIBRATION_LRS:
            table += [{**r, "lr": lr} for r in rows({**hyper, "lr": lr}, seeds,
                                                      ["clip_grad_norm_(1.0)"], log)]
    else:
        table = rows(hyper, seeds, log=log)
    seconds = time.perf_counter() - start
    return write(out_dir, stem, table, hyper, seeds, seconds, command,
                 key="lr" if calibrate else "config")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safeopt_bench.lm_report``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, for CI")
    parser.add_argument("--calibrate", action="store_true",
                        help="sweep the learning rate with clip_grad_norm_(1.0)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help=f"the sweep's learning rates (default: {list(CALIBRATION_LRS)})")
    parser.add_argument("--episode", action="store_true",
                        help="the bad-data episode (safeopt_bench.lm.EPISODE) instead")
    parser.add_argument("--out", default="safeopt-bench")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    command = " ".join(["python -m safeopt_bench.lm_report",
                        *(sys.argv[1:] if argv is None else argv)])
    md, js, png = run(Path(args.out), command, args.quick, args.seeds, args.steps,
                      args.calibrate, args.lrs, args.episode)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md}, {js}" + (f" and {png}" if png else " (no matplotlib: no PNG)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
