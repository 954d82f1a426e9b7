"""What the report reads from telemetry records: series, counters, layer norms, names.

Records are the JSON Lines of :mod:`safeopt.telemetry`; any number in them
may be ``null`` (a NaN/Inf the writer could not store), NaN, Inf or missing,
and all of these read as NaN here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_MAX_NAME = 28


@dataclasses.dataclass
class Run:
    """One column of the picture.

    Attributes:
      label: The column's title (a file name, ``"bare"``, ``"safeopt"``).
      records: The run's telemetry records, in step order.
      verdict: The verdict of its diagnosis, shown next to the label.
      clipped: Fraction of the applied updates a norm clip changed, if known.
    """

    label: str
    records: Sequence[dict[str, Any]]
    verdict: str | None = None
    clipped: float | None = None

    @property
    def steps(self) -> np.ndarray:
        return series(self.records, "step")


def _float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def series(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """``key`` of each record as floats: ``null``, missing, NaN and Inf read as NaN."""
    values = np.array([_float(r.get(key)) for r in records], dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def increments(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """Whether counter ``key`` went up since the previous record (unreadable counts: 0)."""
    values = np.nan_to_num(series(records, key), nan=0.0)
    return np.diff(values, prepend=0.0) > 0


def nonfinite(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Records whose interval carried NaN/Inf: the ``nonfinite`` counter went up, or the
    record's loss or gradient norm is NaN/Inf (``null``) where the run had them."""
    bad = increments(records, "nonfinite")
    for key in ("loss", "grad_norm"):
        values = series(records, key)
        seen = np.cumsum(np.isfinite(values)) > 0  # a loss never given is not NaN
        bad |= seen & ~np.isfinite(values)
    return bad


def layer_matrix(records: Sequence[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """``(layer names, norms[layer, record])`` from the records' top-k layers.

    A layer missing from a record's top-k is NaN; one listed with ``null``
    (or NaN/Inf) is ``inf``, so that the two stay apart. Layers are ordered
    by their largest finite norm, largest first.
    """
    names: list[str] = []
    for rec in records:
        for name in _layers(rec):
            if name not in names:
                names.append(name)
    grid = np.full((len(names), len(records)), np.nan)
    index = {n: i for i, n in enumerate(names)}
    for j, rec in enumerate(records):
        for name, value in _layers(rec).items():
            f = _float(value)
            grid[index[name], j] = f if math.isfinite(f) else math.inf
    if names:
        finite = np.where(np.isfinite(grid), grid, -np.inf)
        peak = finite.max(axis=1)
        order = np.argsort(-peak, kind="stable")
        names = [names[i] for i in order]
        grid = grid[order]
    return names, grid


def _layers(rec: dict[str, Any]) -> dict[str, Any]:
    layers = rec.get("layers")
    return {str(k): v for k, v in layers.items()} if isinstance(layers, dict) else {}


def short_names(names: Sequence[str], limit: int = _MAX_NAME) -> list[str]:
    """Names that fit a heat map's axis: long paths keep their last parts.

    A leading ``/``-part that every name shares (a Keras model's name) is
    dropped. A name still longer than ``limit`` keeps its last two parts
    (the layer and the parameter): ``"model/rnn/simple_rnn_cell/kernel"``
    reads as ``".../simple_rnn_cell/kernel"``; more parts come back where
    needed to keep the names apart. A name still longer than twice
    ``limit`` is cut in the middle.
    """
    names = _common_prefix_dropped(names)
    depth = max((n.count("/") for n in names), default=0)
    for keep in range(2, depth + 1):
        out = [_tail(n, keep, limit) for n in names]
        if len(set(out)) == len(out):
            break
    else:
        out = list(names)
    half = limit // 2
    return [n if len(n) <= 2 * limit else n[:half] + "..." + n[-half:] for n in out]


def _common_prefix_dropped(names: Sequence[str]) -> list[str]:
    parts = [n.split("/") for n in names]
    drop = 0
    while (parts and all(len(p) > drop + 2 for p in parts)
           and len({p[drop] for p in parts}) == 1):
        drop += 1
    return ["/".join(p[drop:]) for p in parts]


def _tail(name: str, keep: int, limit: int) -> str:
    if len(name) <= limit:
        return name
    parts = name.split("/")
    return name if len(parts) <= keep else ".../" + "/".join(parts[-keep:])
