"""Telemetry sinks: where safeopt's throttled records go.

Nothing is recorded unless ``policy.log_every > 0``. Then, every
``log_every``-th step, :func:`after_step` reads safeopt's state once (one host
synchronisation per interval, none in between) and hands one record to
every sink: those the policy configures (``log_file``: JSON Lines,
``log_logger``: Python :mod:`logging`, ``log_tensorboard``: TensorBoard
event files) and those added with :func:`add_sink`.

A record is a flat JSON-ready dict: ``step``, ``updates``, ``applied``,
``skips``, ``consecutive_skips``, ``nonfinite``, ``norm_clips``,
``value_clips``, ``spikes``, ``grad_norm`` (pre-clip norm of the last applied
update), ``scale``, ``threshold``, ``clipped`` and ``skipped`` (flags of the
last update), ``weight_norm``, ``loss``, ``layers`` (the ``log_top_k``
largest per-layer gradient-norm EMAs, by parameter name), ``signs`` (letters
of the active signs of exploding gradients) and ``diagnosis``
(:meth:`safeopt.Diagnosis.to_dict`). Non-finite numbers become ``null``.

Adapters call :func:`after_step` once per step with their host step counter;
in a jitted JAX loop, call it yourself with the optimizer state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from safeopt._diagnosis import jsonable
from safeopt._policy import Policy

__all__ = ["JsonlSink", "LoggingSink", "Sink", "TensorBoardSink", "add_sink", "close_sinks",
           "format_record", "remove_sink"]


@runtime_checkable
class Sink(Protocol):
    """Where records go: anything with ``write(record)`` (and optionally ``close()``)."""

    def write(self, record: dict[str, Any]) -> None:
        """Takes one record."""


class JsonlSink:
    """Appends each record as one JSON line to ``path`` (what ``safeopt report`` reads).

    Args:
      path: The file; its directory is created when missing.
      mode: ``"a"`` appends to an existing file, ``"w"`` truncates it first.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "a") -> None:
        if mode not in ("a", "w"):
            raise ValueError(f"`mode` must be 'a' or 'w'. Received: mode={mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open(mode, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        """Writes ``record`` as one line and flushes it."""
        line = json.dumps(jsonable(record), allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        """Closes the file."""
        self._file.close()


class LoggingSink:
    """Sends each record to a :mod:`logging` logger as one readable line.

    The full record rides along as ``extra={"safeopt": record}`` for handlers
    that want the numbers.

    Args:
      logger: A logger or a logger name.
      level: The level records are logged at.
    """

    def __init__(self, logger: str | logging.Logger = "safeopt",
                 level: int = logging.INFO) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def write(self, record: dict[str, Any]) -> None:
        """Logs ``record``."""
        self.logger.log(self.level, "%s", format_record(record), extra={"safeopt": record})

    def close(self) -> None:
        """Nothing to close."""


class TensorBoardSink:
    """Writes scalars to TensorBoard event files.

    Uses ``tensorboardX.SummaryWriter`` (``pip install tensorboardX``: no
    framework needed), or any writer with ``add_scalar(tag, value, step)``
    that you pass, such as ``torch.utils.tensorboard.SummaryWriter``.

    Args:
      logdir: Directory of the event files.
      writer: A ready ``SummaryWriter``-like object (then ``logdir`` is unused).
    """

    def __init__(self, logdir: str | os.PathLike[str] | None = None, writer: Any = None) -> None:
        self.writer = writer if writer is not None else _summary_writer(logdir)

    def write(self, record: dict[str, Any]) -> None:
        """Adds each scalar of ``record`` (and each listed layer norm) at its step."""
        step = int(record["step"])
        for key in ("grad_norm", "scale", "threshold", "weight_norm", "loss", "skips",
                    "norm_clips", "nonfinite"):
            value = record.get(key)
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(f"safeopt/{key}", float(value), step)
        for name, value in (record.get("layers") or {}).items():
            if value is not None:
                self.writer.add_scalar(f"safeopt/layer_grad_norm/{name}", float(value), step)
        if hasattr(self.writer, "flush"):
            self.writer.flush()

    def close(self) -> None:
        """Closes the writer."""
        if hasattr(self.writer, "close"):
            self.writer.close()


def _summary_writer(logdir: str | os.PathLike[str] | None) -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "`log_tensorboard` needs a TensorBoard writer: pip install tensorboardX, or pass "
            f"TensorBoardSink(writer=...) any object with add_scalar ({err})") from None
    return SummaryWriter(logdir=None if logdir is None else os.fspath(logdir))


# ---------------------------------------------------------------------------
# Sink registry.
# ---------------------------------------------------------------------------
_SINKS: list[Sink] = []
_CONFIG_SINKS: dict[tuple[str, str], Sink] = {}
_LOCK = threading.Lock()


def add_sink(sink: Sink) -> Sink:
    """Sends every later record of every wrapped optimizer to ``sink`` too.

    Records are made only for policies with ``log_every > 0``.

    Args:
      sink: A :class:`JsonlSink`, :class:`LoggingSink`, :class:`TensorBoardSink`
        or any object with ``write(record)``.

    Returns:
      ``sink``, for :func:`remove_sink`.
    """
    if not callable(getattr(sink, "write", None)):
        raise TypeError(f"`sink` must have a write(record) method. Received: sink={sink!r}")
    with _LOCK:
        _SINKS.append(sink)
    return sink


def remove_sink(sink: Sink) -> None:
    """Stops sending records to ``sink`` (does not close it)."""
    with _LOCK:
        if sink in _SINKS:
            _SINKS.remove(sink)


def sinks_for(policy: Policy) -> list[Sink]:
    """The sinks a record of a run under ``policy`` goes to (config ones opened once)."""
    wanted = []
    if policy.log_file:
        wanted.append(("file", policy.log_file))
    if policy.log_logger:
        wanted.append(("logger", policy.log_logger))
    if policy.log_tensorboard:
        wanted.append(("tensorboard", policy.log_tensorboard))
    with _LOCK:
        out: list[Sink] = []
        for key in wanted:
            if key not in _CONFIG_SINKS:
                _CONFIG_SINKS[key] = _open(*key)
            out.append(_CONFIG_SINKS[key])
        return out + list(_SINKS)


def _open(kind: str, target: str) -> Sink:
    if kind == "file":
        return JsonlSink(target)
    if kind == "logger":
        return LoggingSink(target)
    return TensorBoardSink(target)


def close_sinks() -> None:
    """Closes and forgets the sinks opened from policy keys (``log_file``...)."""
    with _LOCK:
        for sink in _CONFIG_SINKS.values():
            close = getattr(sink, "close", None)
            if callable(close):
                close()
        _CONFIG_SINKS.clear()


def format_record(rec: Mapping[str, Any]) -> str:
    """One readable line for ``rec`` (what :class:`LoggingSink` logs)."""
    def fmt(value: Any) -> str:
        return "nan" if value is None else f"{value:.4g}"

    flags = "".join(f for f, on in (("C", rec.get("clipped")), ("S", rec.get("skipped")))
                    if on) or "-"
    signs = ",".join(rec.get("signs") or []) or "none"
    return (f"safeopt step {rec['step']}: grad_norm={fmt(rec.get('grad_norm'))} "
            f"scale={fmt(rec.get('scale'))} threshold={fmt(rec.get('threshold'))} "
            f"loss={fmt(rec.get('loss'))} weight_norm={fmt(rec.get('weight_norm'))} "
            f"flags={flags} skips={rec.get('skips')} clips={rec.get('norm_clips')} "
            f"signs={signs}")
