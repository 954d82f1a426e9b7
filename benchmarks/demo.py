"""``safeopt demo``: training runs that die of exploding gradients, saved by safeopt.

The demo trains the textbook cases of exploding gradients twice, with the same
data, initialisation and hyper-parameters: once with the bare optimizer and
once with the optimizer wrapped by :func:`safeopt.wrap` (the ``default``
policy). It prints a side-by-side table, the diagnosis of each run, and writes
the runs' telemetry (JSON Lines) and, per task, the report PNG of both runs
side by side on shared axes to ``--out``. Steps are counted from 1 in
everything it prints, as in the telemetry's ``step``.

The framework-specific parts (models and training loops) live with each
adapter (``safeopt_torch.demo``, ``safeopt_optax.demo``,
``safeopt_keras.demo``), which names its demo module in the registry
(``Adapter.demo``); each is imported only when the demo runs in that
framework. The data and initial weights come from :mod:`safeopt_bench.data`.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063 (the addition problem and
  norm clipping).
  Glorot & Bengio (2010), Understanding the difficulty of training deep
  feedforward neural networks (deep sigmoid/tanh networks and their init).
  Brownlee (2017), A Gentle Introduction to Exploding Gradients in Neural
  Networks (regression MLP with large targets, the signs and the remedies).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

import safeopt.adapter as sa
from safeopt._report import ReportError, render_runs
from safeopt.telemetry import JsonlSink

FRAMEWORKS: tuple[str, ...] = ("torch", "jax", "keras")
_REQUIRES = {"torch": ("torch",), "jax": ("jax", "optax"), "keras": ("keras",)}
_ADAPTERS = {"torch": "torch", "jax": "optax", "keras": "keras"}  # entry-point names

#: What a framework module reports after each step: ``step`` (0-based),
#: ``total`` (steps asked for), ``loss``, ``grad_norm`` (raw global norm),
#: ``tensor_norms`` (raw per-tensor norms, parameter order), ``weight_norm``
#: , ``names`` (parameter names) and, for a wrapped run, ``wrapped`` (what
#: ``safeopt.stats`` accepts: the optimizer, or the Optax state).
Record = dict[str, Any]
OnStep = Callable[[Record], bool]


@dataclasses.dataclass
class Outcome:
    """What a framework module returns for one training run.

    Attributes:
      final_loss: Loss on fresh data after training (NaN when the model is).
      accuracy: Fraction of fresh examples right, where that applies.
      steps: Steps the run was asked for.
      names: Parameter names in tensor order.
      stats: ``safeopt.stats`` of the wrapped optimizer (``None`` when bare).
      diagnosis: ``safeopt.diagnose`` of the wrapped optimizer, when available.
    """

    final_loss: float
    accuracy: float | None
    steps: int
    names: list[str]
    stats: dict[str, Any] | None = None
    diagnosis: Any = None


class FrameworkDemo(Protocol):
    """What an adapter's demo module provides."""

    TASKS: dict[str, str]

    def train(self, task: str, protected: bool, steps: int | None, seed: int,
              on_step: OnStep) -> Outcome:
        """Trains ``task`` once, bare or wrapped with the ``default`` policy.

        Args:
          task: A key of ``TASKS``.
          protected: Wrap the optimizer with ``safeopt.wrap(opt, "default")``.
          steps: Number of SGD steps (``None``: the demo's own count).
          seed: Seed of the data and the initialisation.
          on_step: Called with each step's record; returning ``True`` stops.

        Returns:
          The :class:`Outcome`.
        """


@dataclasses.dataclass
class RunResult:
    """One run of one task, summarised for the table.

    Attributes:
      task: The task's key.
      title: The task's description.
      arm: ``"bare"`` or ``"safeopt"``.
      outcome: What the framework module returned.
      raw: Per-step measurements (``loss``, ``grad_norm``, ``weight_norm``).
      records: Per-step telemetry records (the JSON Lines format of
        :mod:`safeopt.telemetry`).
      seconds: Wall time of the run.
    """

    task: str
    title: str
    arm: str
    outcome: Outcome
    raw: list[Record]
    records: list[Record]
    seconds: float

    @property
    def ran(self) -> int:
        """Steps that ran (a bare run whose weights went NaN/Inf is stopped early)."""
        return len(self.raw)

    @property
    def nan_steps(self) -> int:
        """Steps that ran with a NaN/Inf loss or gradients."""
        return sum(1 for r in self.raw if not _finite(r["loss"], r["grad_norm"]))

    @property
    def first_nan(self) -> int | None:
        """First step (0-based index) with a NaN/Inf loss or gradient, if any."""
        return next((i for i, r in enumerate(self.raw)
                     if not _finite(r["loss"], r["grad_norm"])), None)

    @property
    def clipped(self) -> int | None:
        """Steps whose gradient norm was clipped (``None`` for a bare run)."""
        return None if self.outcome.stats is None else int(self.outcome.stats["norm_clips"])

    @property
    def skipped(self) -> int | None:
        """Steps skipped by safeopt (``None`` for a bare run)."""
        return None if self.outcome.stats is None else int(self.outcome.stats["skips"])


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


# ---------------------------------------------------------------------------
# Progress bar (stderr; no dependency).
# ---------------------------------------------------------------------------
class ProgressBar:
    """A one-line progress bar: ``label |#####.....| 150/300 loss 3.2e+01``.

    On a terminal it redraws in place; otherwise it prints at 0%, 50% and 100%
    so that logs stay short.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 width: int = 24) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = -1.0
        self._marks = {1, self.total // 2}

    def update(self, done: int, loss: float) -> None:
        """Shows ``done`` of ``total`` steps and the latest loss."""
        now = time.monotonic()
        if self._tty:
            if done < self.total and now - self._last < 0.1:
                return
            self._last = now
            self.stream.write("\r" + self._line(done, loss))
            self.stream.flush()
        elif done in self._marks:
            self._marks.discard(done)
            self.stream.write(self._line(done, loss) + "\n")

    def close(self, done: int, loss: float, note: str = "") -> None:
        """Draws the final state and ends the line."""
        line = self._line(done, loss) + (f"  {note}" if note else "")
        if self._tty:
            self.stream.write("\r" + line + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _line(self, done: int, loss: float) -> str:
        filled = int(self.width * min(done, self.total) / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} |{bar}| {done}/{self.total} train loss {loss:.3g}"


# ---------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------
def default_framework() -> str:
    """The first installed framework among torch, jax (with optax), keras."""
    for name in FRAMEWORKS:
        if framework_installed(name):
            return name
    raise RuntimeError(
        "safeopt demo needs a framework. Install one, e.g. pip install 'safeopt[torch]' "
        "(or [jax], [keras])."
    )


def framework_installed(name: str) -> bool:
    """Whether every module the ``name`` demo needs can be imported."""
    return all(importlib.util.find_spec(mod) is not None for mod in _REQUIRES[name])


def load_framework(name: str) -> FrameworkDemo:
    """Imports the framework and its adapter's demo module (``Adapter.demo``)."""
    if name not in FRAMEWORKS:
        raise ValueError(f"`framework` must be one of {list(FRAMEWORKS)}. Received: "
                         f"framework={name!r}")
    if not framework_installed(name):
        raise RuntimeError(f"The {name} demo needs {' and '.join(_REQUIRES[name])}: "
                           f"pip install 'safeopt[{'jax' if name == 'jax' else name}]'.")
    for module_name in _REQUIRES[name]:
        _import_framework(module_name)
    adapter = sa.adapter_for_framework(_ADAPTERS[name])
    if adapter is None or adapter.demo is None:
        raise RuntimeError(f"No installed safeopt adapter for {name} has a demo. Installed "
                           f"adapters: {sa.installed_adapters()}")
    module: Any = importlib.import_module(adapter.demo)
    return module


def _import_framework(module_name: str) -> None:
    """Imports a framework, naming ``KERAS_BACKEND`` when Keras lacks its backend."""
    try:
        importlib.import_module(module_name)
    except ImportError as err:
        if module_name != "keras":
            raise
        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
        raise RuntimeError(
            f"Keras could not load its backend {backend!r} ({err}). Keras uses the backend "
            "named by the KERAS_BACKEND environment variable (tensorflow when unset): install "
            "it (pip install tensorflow-cpu, jax or torch) or set KERAS_BACKEND=jax or "
            "KERAS_BACKEND=torch.") from None


def run_one(demo: FrameworkDemo, task: str, protected: bool, steps: int | None, seed: int,
            stream: TextIO | None = None) -> RunResult:
    """Trains ``task`` once (bare or protected) with a progress bar; returns the result.

    Each step becomes a telemetry record (:mod:`safeopt._telemetry`): read from
    the wrapped optimizer for a protected run, replayed through the core's
    monitor (:class:`Replay`) for a bare run.
    """
    arm = "safeopt" if protected else "bare"
    raw: list[Record] = []
    records: list[Record] = []
    bars: list[ProgressBar] = []
    replay: list[Replay] = []

    def on_step(measured: Record) -> bool:
        if not bars:
            bars.append(ProgressBar(f"  {task:<5} {arm:<7}", int(measured["total"]), stream))
            replay.append(Replay(len(measured["tensor_norms"])))
        raw.append({k: measured[k] for k in ("loss", "grad_norm", "weight_norm")})
        step = int(measured["step"]) + 1
        if protected:
            records.append(_telemetry_record(measured["wrapped"], step))
        else:
            records.append(replay[0].record(measured, step, measured["names"]))
        bars[0].update(len(raw), measured["loss"])
        # A bare run whose weights are NaN/Inf cannot recover: stop it here
        # (the remaining steps are counted as NaN steps).
        return not protected and not _finite(measured["weight_norm"])

    start = time.perf_counter()
    outcome = demo.train(task, protected, steps, seed, on_step)
    seconds = time.perf_counter() - start
    if outcome.diagnosis is None and replay:
        outcome.diagnosis = replay[0].diagnosis(outcome.names)
    if bars:
        stopped = len(raw) < outcome.steps
        note = f"NaN weights at step {len(raw)}; stopped" if stopped else ""
        bars[0].close(len(raw), raw[-1]["loss"] if raw else math.nan, note)
    return RunResult(task, demo.TASKS[task], arm, outcome, raw, records, seconds)


def _telemetry_record(wrapped: Any, step: int) -> Record:
    return sa.record(wrapped, step)


class Replay:
    """Feeds a bare run's statistics through the core's monitor, in NumPy.

    Each step's raw statistics go through the core's decision under a
    policy that changes nothing (no clip, no skip), so the bare run gets the
    same signs, records and diagnosis as a wrapped one.
    """

    def __init__(self, n_tensors: int) -> None:
        self.xp = sa.namespace_by_name("numpy")
        self.policy = sa.Policy(clip_norm=None, skip_nonfinite=False,
                                max_consecutive_skips=None, monitor_every=1)
        self.state = sa.init_state(self.xp, self.policy, n_tensors=n_tensors)

    def record(self, measured: Record, step: int, names: Sequence[str]) -> Record:
        """Updates the monitor with one step; returns its telemetry record."""
        stats = sa.GradStats(
            norm=np.float32(measured["grad_norm"]), raw_norm=np.float32(measured["grad_norm"]),
            loss=np.float32(measured["loss"]), weight_norm=np.float32(measured["weight_norm"]),
            tensor_norms=np.asarray(measured["tensor_norms"], np.float32))
        with np.errstate(all="ignore"):
            _, self.state = sa.decide(self.xp, self.policy, self.state, stats)
            return sa.make_record(self.policy, self.state, {"names": list(names)}, step=step,
                                  loss=measured["loss"])

    def diagnosis(self, names: Sequence[str]) -> Any:
        """The diagnosis of the steps seen so far."""
        return sa.diagnose_state(self.policy, self.state, list(names))


def run_demo(framework: str | None = None, out: str | Path = "safeopt-demo",
             steps: int | None = None, seed: int = 0, report: bool = True,
             stream: TextIO | None = None) -> list[RunResult]:
    """Runs every task of the framework's demo bare and wrapped; prints and writes results.

    Args:
      framework: ``"torch"``, ``"jax"`` or ``"keras"``; ``None`` picks the first
        one installed.
      out: Directory for the JSON Lines telemetry, the summary JSON and the
        report PNG.
      steps: Override the number of training steps of every task (smoke tests).
      seed: Seed of data and initialisation (the same for both runs).
      report: Whether to render the report PNG (needs matplotlib).
      stream: Where the text goes (default: stdout).

    Returns:
      The results, bare then wrapped, task by task.
    """
    text = sys.stdout if stream is None else stream
    name = framework or default_framework()
    demo = load_framework(name)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"safeopt demo ({name}): each task trains twice with the same data, init and "
          "hyper-parameters: bare, then wrapped by safeopt.wrap(opt, 'default').", file=text)
    print(f"Files go to {out_dir.resolve()} (--out DIR to change).", file=text)
    results: list[RunResult] = []
    start = time.perf_counter()
    for task, title in demo.TASKS.items():
        print(f"\n{task}: {title}", file=text, flush=True)
        for protected in (False, True):
            results.append(run_one(demo, task, protected, steps, seed, stream=stream))
    elapsed = time.perf_counter() - start
    print("\n" + table(results), file=text)
    print(f"\n(total {elapsed:.0f} s)", file=text)
    for result in results:
        print("\n" + diagnosis_text(result), file=text)
    written = write_outputs(results, out_dir, name, report, text)
    print("\nwrote: " + ", ".join(str(p) for p in written), file=text)
    return results


# ---------------------------------------------------------------------------
# Presenting.
# ---------------------------------------------------------------------------
def _fmt(value: float | int | None, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def table(results: Sequence[RunResult]) -> str:
    """The side-by-side Markdown table of the runs.

    "train loss" is the last step's loss on its batch (what the progress bar
    shows); "loss on fresh data" is measured after training on data the run
    never saw, and reads "diverged" for a run that went NaN/Inf, whatever
    number its broken weights then give (an overflowed but finite one, or NaN).
    """
    lines = ["| task | run | steps run | NaN/Inf steps | first NaN/Inf step | steps clipped "
             "| steps skipped | train loss | loss on fresh data | accuracy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ran = f"{r.ran}/{r.outcome.steps}" + (" (stopped: NaN/Inf weights)"
                                              if r.ran < r.outcome.steps else "")
        diverged = r.first_nan is not None
        fresh = "diverged" if diverged else _fmt(r.outcome.final_loss, ".4g")
        train = _fmt(r.raw[-1]["loss"], ".4g") if r.raw else "-"
        acc = None if r.outcome.accuracy is None or diverged else \
            f"{100 * r.outcome.accuracy:.1f}%"
        first = None if r.first_nan is None else r.first_nan + 1  # counted from 1
        lines.append(f"| {r.task} | {r.arm} | {ran} | {r.nan_steps} | {_fmt(first)} "
                     f"| {_fmt(r.clipped)} | {_fmt(r.skipped)} | {train} | {fresh} "
                     f"| {acc or '-'} |")
    return "\n".join(lines)


def diagnosis_text(result: RunResult) -> str:
    """The diagnosis of a run (``safeopt.diagnose``; for a bare run, of its replay)."""
    how = "safeopt.diagnose" if result.arm == "safeopt" else "replayed from its statistics"
    return f"diagnosis of {result.task} / {result.arm} ({how}):\n{result.outcome.diagnosis}"


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------
def write_jsonl(records: Sequence[Record], path: Path) -> Path:
    """Writes telemetry records as JSON Lines (what ``safeopt report`` reads)."""
    sink = JsonlSink(path, mode="w")
    try:
        for record in records:
            sink.write(record)
    finally:
        sink.close()
    return path


def write_outputs(results: Sequence[RunResult], out_dir: Path, framework: str,
                  report: bool, stream: TextIO | None = None) -> list[Path]:
    """Writes each run's JSONL, each task's report PNG (its runs side by side), ``summary.json``.

    In ``summary.json``, ``first_nan_step`` is a 0-based step index, like the
    diagnosis's data; the printed table counts from 1.
    """
    written: list[Path] = []
    summary = []
    for r in results:
        stem = f"{framework}_{r.task}_{r.arm}"
        log = write_jsonl(r.records, out_dir / f"{stem}.jsonl")
        written.append(log)
        summary.append({
            "framework": framework, "task": r.task, "title": r.title, "run": r.arm,
            "final_loss": _json_number(r.outcome.final_loss), "accuracy": r.outcome.accuracy,
            "steps": r.outcome.steps, "steps_run": r.ran, "nan_steps": r.nan_steps,
            "first_nan_step": r.first_nan,
            "clipped": r.clipped, "skipped": r.skipped, "seconds": round(r.seconds, 2),
            "verdict": getattr(r.outcome.diagnosis, "verdict", None), "jsonl": log.name})
    if report:
        for task, runs in _by_task(results).items():
            png = render_report(runs, out_dir / f"{framework}_{task}.png",
                                f"safeopt demo ({framework}): {task}, bare vs safeopt", stream)
            if png is not None:
                written.append(png)
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    written.append(path)
    return written


def _by_task(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    tasks: dict[str, list[RunResult]] = {}
    for r in results:
        if r.records:
            tasks.setdefault(r.task, []).append(r)
    return tasks


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def render_report(runs: Sequence[RunResult], png: Path, title: str,
                  stream: TextIO | None = None) -> Path | None:
    """Renders the runs of one task side by side (``safeopt report A B``); ``None`` without
    matplotlib. A run that stopped early is marked so up to the steps asked for."""
    total = max(r.outcome.steps for r in runs)
    try:
        return render_runs([(r.arm, r.records) for r in runs], png, title, total=total)
    except ReportError as err:
        print(f"(no report PNG: {err})", file=stream or sys.stderr)
        return None
