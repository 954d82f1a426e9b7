"""Stability benchmark: which protection keeps explosive training alive, and solves it.

For each task (the demo's explosive MLP and RNN; the addition and
temporal-order problems of Pascanu, Mikolov & Bengio (2013) at sequence
lengths 50, 100 and 200, vanilla RNN of 50 tanh units, recurrent spectral
radius 1.5, plain SGD) and each configuration (no protection,
``clip_grad_norm_(1.0)``, safeopt ``default``, safeopt ``adaptive="zscore"``,
and the peers ``zclip`` and ``smartclip`` (its ``ZScoreClip``) when
installed: ``pip install "safeopt[peers]"``), it trains one run per seed with the same
hyper-parameters and reports the success rate (success: fewer than 1% of
fresh sequences wrong; an addition sequence is wrong when its squared error
exceeds 0.04) and the median final loss. Only PyTorch is measured: the
policies are the same math in every framework.

The task ``lm`` is the language-model benchmark of
:mod:`safeopt_bench.lm_report`: a small pre-LN transformer on the Python
standard library's source with AdamW at a learning rate where
``clip_grad_norm_(1.0)`` shows loss spikes; it writes its own table, JSON and
loss curves (``lm_stability.*``). ``lm-episode`` trains the same model at a
moderate learning rate through a stretch of corrupt batches
(``lm_episode.*``): what a recovery saves.

Run:
  python -m safeopt_bench.stability            # full (see the run time it prints)
  python -m safeopt_bench.stability --quick    # CI: one length, 2 seeds, few steps
  safeopt bench --stability [--quick]
  safeopt bench --stability --tasks lm           # only the language model
  safeopt bench --stability --tasks lm-episode   # the language model and corrupt data
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

TASKS = ("mlp", "rnn", "addition", "temporal_order", "lm", "lm-episode")
"""Every task; ``lm`` is the language model and ``lm-episode`` the same model meeting a
stretch of corrupt data (:mod:`safeopt_bench.lm_report`)."""
FULL: dict[str, Any] = {"tasks": TASKS,
                        "lengths": (50, 100, 200), "seeds": 5, "steps": 1000}
QUICK: dict[str, Any] = {"tasks": ("mlp", "addition", "temporal_order", "lm", "lm-episode"),
                         "lengths": (50,),
                         "seeds": 2, "steps": 150}


def plan(tasks: Sequence[str], lengths: Sequence[int]) -> list[tuple[str, int]]:
    """``(task, length)`` pairs; the demo's tasks have a fixed length (``lm`` runs apart)."""
    out: list[tuple[str, int]] = []
    for task in tasks:
        if task.startswith("lm"):
            continue
        if task in ("mlp", "rnn"):
            out.append((task, 0))
        else:
            out.extend((task, n) for n in lengths)
    return out


def rows(tasks: Sequence[str] = FULL["tasks"], lengths: Sequence[int] = FULL["lengths"],
         seeds: int = FULL["seeds"], steps: int = FULL["steps"],
         log: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Runs every (task, length, configuration, seed); returns one row per run.

    Args:
      tasks: Task names (see ``safeopt_bench.tasks_torch.TASKS``).
      lengths: Sequence lengths of the Pascanu problems.
      seeds: Seeds per configuration (0 .. seeds-1).
      steps: SGD steps per run.
      log: A JSON Lines file that receives each row as it is measured.
      progress: Print one line per run to stderr.
    """
    from safeopt_bench import tasks_torch

    configs = list(tasks_torch.configurations())
    out: list[dict[str, Any]] = []
    jobs = [(t, n, c, s) for t, n in plan(tasks, lengths) for c in configs
            for s in range(seeds)]
    sink = log.open("a", encoding="utf-8") if log is not None else None
    try:
        for i, (task, length, config, seed) in enumerate(jobs, 1):
            row = tasks_torch.run(task, length, config, seed, steps)
            out.append(row)
            if sink is not None:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            if progress:
                print(f"[{i}/{len(jobs)}] {task} {length or ''} {config} seed {seed}: "
                      f"loss {row['final_loss']:.4g}, wrong {100 * row['error_rate']:.1f}%, "
                      f"{row['seconds']:.1f}s", file=sys.stderr, flush=True)
    finally:
        if sink is not None:
            sink.close()
    return out


def summarize(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (task, length, configuration): success rate, losses, NaN runs."""
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for r in table:
        groups.setdefault((r["task"], r["length"], r["config"]), []).append(r)
    out = []
    for (task, length, config), runs in groups.items():
        losses = [r["final_loss"] for r in runs]
        finite = [v for v in losses if math.isfinite(v)]
        out.append({
            "task": task, "length": length, "config": config, "runs": len(runs),
            "success": sum(r["success"] for r in runs),
            "nan_runs": sum(r["first_nan_step"] is not None for r in runs),
            "median_loss": statistics.median(finite) if len(finite) == len(losses) else math.nan,
            "median_error": statistics.median(r["error_rate"] for r in runs),
        })
    return out


def markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table."""
    lines = ["| task | T | configuration | success | runs with NaN | median final loss "
             "| median % wrong |", "|---|---:|---|---:|---:|---:|---:|"]
    for s in summary:
        loss = s["median_loss"]
        loss_text = f"{loss:.4g}" if math.isfinite(loss) else "NaN/Inf"
        lines.append(f"| {s['task']} | {s['length'] or '-'} | {s['config']} "
                     f"| {s['success']}/{s['runs']} | {s['nan_runs']}/{s['runs']} | {loss_text} "
                     f"| {100 * s['median_error']:.1f} |")
    return "\n".join(lines)


def header(settings: dict[str, Any], seconds: float, command: str) -> str:
    """Date, machine, command, settings and run time, for the README."""
    from safeopt_bench import tasks_torch

    env = tasks_torch.environment()
    tasks = [t for t in settings["tasks"] if not t.startswith("lm")]
    return (f"Measured {_dt.date.today().isoformat()} on {platform.machine()} "
            f"({platform.processor() or platform.platform()}), torch {env['torch']}, "
            f"{env['threads']}, with `{command}`: tasks {tasks}, lengths "
            f"{list(settings['lengths'])}, {settings['seeds']} seeds, {settings['steps']} SGD "
            f"steps per run, hyper-parameters {tasks_torch.HYPER} (the MLP: lr 0.03, momentum "
            f"0.9, batch 64). Run time {seconds / 60:.1f} min.")


def write(out_dir: Path, table: Sequence[dict[str, Any]], settings: dict[str, Any],
          seconds: float, command: str) -> tuple[Path, Path]:
    """Writes ``stability.md`` and ``stability.json``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(table)
    text = header(settings, seconds, command) + "\n\n" + markdown(summary) + "\n"
    md = out_dir / "stability.md"
    md.write_text(text, encoding="utf-8")
    js = out_dir / "stability.json"
    js.write_text(json.dumps({"settings": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in settings.items()},
                              "seconds": seconds, "command": command, "summary": summary,
                              "runs": list(table)}, indent=2, default=str), encoding="utf-8")
    return md, js


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: ``FULL`` or ``QUICK``, with any hidden overrides."""
    settings = dict(QUICK if args.quick else FULL)
    if getattr(args, "seeds", None):
        settings["seeds"] = args.seeds
    if getattr(args, "steps", None):
        settings["steps"] = args.steps
    if getattr(args, "lengths", None):
        settings["lengths"] = tuple(args.lengths)
    if getattr(args, "tasks", None):
        unknown = [t for t in args.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"`tasks` must be among {list(TASKS)}. Received: tasks={unknown}")
        settings["tasks"] = tuple(args.tasks)
    return settings


def run_cli(args: argparse.Namespace) -> int:
    """What ``safeopt bench --stability`` runs: the recurrent tasks, then the language model."""
    settings = settings_from(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "safeopt bench --stability" + (" --quick" if args.quick else "")
    if getattr(args, "tasks", None):
        command += " --tasks " + " ".join(settings["tasks"])
    written: list[Path] = []
    if plan(settings["tasks"], settings["lengths"]):
        log = out_dir / "stability_runs.jsonl"
        log.unlink(missing_ok=True)
        start = time.perf_counter()
        table = rows(settings["tasks"], settings["lengths"], settings["seeds"],
                     settings["steps"], log=log)
        seconds = time.perf_counter() - start
        md, js = write(out_dir, table, settings, seconds, command)
        print(md.read_text(encoding="utf-8"))
        written += [md, js, log]
    for task in ("lm", "lm-episode"):
        if task not in settings["tasks"]:
            continue
        from safeopt_bench import lm_report

        md, js, png = lm_report.run(out_dir, command, quick=args.quick,
                                    seeds=getattr(args, "seeds", None),
                                    steps=getattr(args, "steps", None),
                                    episode=task == "lm-episode")
        print(md.read_text(encoding="utf-8"))
        written += [md, js, *([png] if png else [])]
    print("wrote " + ", ".join(map(str, written)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safeopt_bench.stability``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="safeopt-bench")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
