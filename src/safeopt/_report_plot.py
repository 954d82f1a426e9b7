"""The report's picture: runs side by side, four panels each, on shared axes.

One column per run (a bare run next to a wrapped one, say), four rows: the
loss; the pre-clip gradient norm with the threshold and the clip / skip
markers; the weight norm; a heat map of the per-layer gradient norms. Every
panel shares the step axis, each row its value axis across the columns, and
the heat maps one colour scale, with its colour bar beside the heat maps
only. Where NaN/Inf starts is marked with a dashed line, steps whose values
are NaN/Inf are shaded, and a run that stopped before the others (or before
``total`` steps) is greyed out from where it stopped. In the heat map,
NaN/Inf cells are coloured apart from blank cells (a layer not among the
record's top-k).

matplotlib is imported only when drawing (``pip install 'safeopt[report]'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from safeopt._report_data import Run, increments, layer_matrix, nonfinite, series, short_names

#: Colours of the verdicts in the column titles.
_VERDICT_COLOURS = {"healthy": "tab:green", "signs": "tab:orange", "exploding": "tab:red"}
_NAN_COLOUR = "#41b6c4"  # NaN/Inf cells of the heat map: apart from magma's black-to-yellow
_DECADES = 4  # how far above the tamest run a shared log scale goes


class PlotError(ValueError):
    """The picture cannot be drawn (matplotlib missing)."""


# ---------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------
def draw(runs: Sequence[Run], out: str | Path, title: str, total: int | None = None) -> Path:
    """Draws ``runs`` side by side into the PNG ``out`` (see :func:`figure`).

    Raises:
      PlotError: matplotlib is not installed.
    """
    plt = _pyplot()
    fig = figure(runs, title, total)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure(runs: Sequence[Run], title: str, total: int | None = None) -> Any:
    """The matplotlib figure of ``runs``, side by side (the caller closes it).

    Args:
      runs: The columns, at least one.
      title: The figure's title.
      total: Steps the runs were asked for (a run that ended before is marked
        as stopped); ``None``: the longest run's last step.

    Raises:
      PlotError: matplotlib is not installed.
    """
    plt = _pyplot()
    names = _union_names(runs)
    grids = [_grid(run.records, names) for run in runs]
    height = 9.0 + 0.12 * max(len(names) - 12, 0)
    fig = plt.figure(figsize=(max(10.0, 1.2 + 6.2 * len(runs)), height), layout="constrained")
    spec = fig.add_gridspec(4, len(runs) + 1, height_ratios=[1, 1.2, 1, 1.4],
                            width_ratios=[1.0] * len(runs) + [0.035])
    axes = np.empty((4, len(runs)), dtype=object)
    for row in range(4):
        for col in range(len(runs)):
            share_x = axes[0, 0] if row or col else None
            share_y = axes[row, 0] if col and row < 3 else None
            axes[row, col] = fig.add_subplot(spec[row, col], sharex=share_x, sharey=share_y)
    end = _end(runs, total)
    for col, run in enumerate(runs):
        _column(axes[:, col], run, end, first=col == 0)
    for row, key in enumerate(("loss", "grad_norm", "weight_norm")):
        floor = [series(r.records, "threshold") for r in runs] if key == "grad_norm" else []
        _shared_scale(axes[row], [series(r.records, key) for r in runs], floor)
    mesh, capped = _heatmaps(axes[3], [run.steps for run in runs], grids, names)
    if mesh is not None:
        fig.colorbar(mesh, cax=fig.add_subplot(spec[3, -1]), label="layer gradient norm",
                     extend="max" if capped else "neither")
    start = min((float(r.steps[0]) for r in runs if len(r.records)), default=0.0)
    axes[0, 0].set_xlim(start - 0.5, end + 0.5)
    fig.suptitle(title or "safeopt run report", fontsize=12)
    return fig


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("safeopt report needs matplotlib: pip install 'safeopt[report]'") \
            from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _end(runs: Sequence[Run], total: int | None) -> float:
    lasts = [float(np.nanmax(r.steps)) for r in runs if np.isfinite(r.steps).any()]
    return float(max([*lasts, total or 0, 1]))


def _union_names(runs: Sequence[Run]) -> list[str]:
    names = [n for run in runs for n in layer_matrix(run.records)[0]]
    peak: dict[str, float] = {}
    for run in runs:
        found, grid = layer_matrix(run.records)
        for name, row in zip(found, grid):
            finite = row[np.isfinite(row)]
            peak[name] = max(peak.get(name, -math.inf), float(finite.max()) if finite.size
                             else -math.inf)
    return sorted(dict.fromkeys(names), key=lambda n: -peak[n])


def _grid(records: Sequence[dict[str, Any]], names: list[str]) -> np.ndarray:
    found, grid = layer_matrix(records)
    out = np.full((len(names), len(records)), np.nan)
    for name, row in zip(found, grid):
        out[names.index(name)] = row
    return out


def _column(axes: Any, run: Run, end: float, first: bool) -> None:
    steps = run.steps
    bad = nonfinite(run.records)
    _line(axes[0], steps, series(run.records, "loss"), "loss", "tab:blue", first)
    _grad_norm(axes[1], run.records, steps, first)
    _line(axes[2], steps, series(run.records, "weight_norm"), "weight norm", "tab:green", first)
    title = ": ".join(t for t in (run.label, run.verdict) if t)
    if run.clipped:
        title += f" ({run.clipped:.0%} of updates clipped)"
    axes[0].set_title(title, fontsize=11, color=_VERDICT_COLOURS.get(run.verdict or "", "black"))
    for row, ax in enumerate(axes):
        _marks(ax, steps, bad, end, label=row == 0)
    axes[-1].set_xlabel("step")
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    if len(steps) and np.isfinite(steps).any() and float(np.nanmax(steps)) < end:
        last = float(np.nanmax(steps))
        axes[0].text((last + end + 1.0) / 2, 0.5, f"stopped at step {last:g}", ha="center",
                     va="center", fontsize=9, color="dimgray",
                     transform=axes[0].get_xaxis_transform())


def _marks(ax: Any, steps: np.ndarray, bad: np.ndarray, end: float, label: bool) -> None:
    """The first NaN/Inf (dashed line), NaN/Inf intervals (shaded), the stop (grey)."""
    edges = _edges(steps)
    if bad.any():
        first = int(np.argmax(bad))
        ax.axvline(steps[first], color="darkred", ls="--", lw=1.2)
        if label:
            ax.text(steps[first], 0.5, f" NaN/Inf from step {steps[first]:g} ", rotation=90,
                    transform=ax.get_xaxis_transform(), ha="right", va="center", fontsize=8,
                    color="darkred")
        for j in np.flatnonzero(bad):
            ax.axvspan(edges[j], edges[j + 1], color="red", alpha=0.12, lw=0)
    if len(steps) and np.isfinite(steps).any() and float(np.nanmax(steps)) < end:
        ax.axvspan(float(np.nanmax(steps)) + 0.5, end + 0.5, color="0.85", alpha=0.6, lw=0)


def _line(ax: Any, steps: np.ndarray, values: np.ndarray, label: str, color: str,
          first: bool) -> None:
    ax.plot(steps, values, color=color, lw=1.2, marker="." if len(steps) < 60 else None)
    if first:
        ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if not np.isfinite(values).any():
        ax.text(0.5, 0.5, f"no finite {label} recorded", transform=ax.transAxes,
                ha="center", va="center", color="gray")


def _grad_norm(ax: Any, records: Sequence[dict[str, Any]], steps: np.ndarray,
               first: bool) -> None:
    norm = series(records, "grad_norm")
    threshold = series(records, "threshold")
    ax.plot(steps, norm, color="tab:purple", lw=1.2, label="grad norm (pre-clip)")
    if np.isfinite(threshold).any():
        ax.step(steps, threshold, where="post", color="black", ls="--", lw=1, label="threshold")
    clipped = increments(records, "norm_clips")
    skipped = increments(records, "skips")
    if clipped.any():  # a rug along the bottom: markers on the line would hide it
        ax.plot(steps[clipped], np.zeros(int(clipped.sum())), "|", color="tab:orange",
                ms=7, transform=ax.get_xaxis_transform(), label="clipped in interval")
    for k, s in enumerate(steps[skipped]):
        ax.axvline(s, color="red", alpha=0.35, lw=1,
                   label="skipped in interval" if k == 0 else None)
    for k, s in enumerate(steps[increments(records, "recoveries")]):
        ax.axvline(s, color="tab:green", lw=2, ls=":",
                   label="recovered from a snapshot" if k == 0 else None)
    if first:
        ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", fontsize=7, ncol=2)


def _range(columns: Sequence[np.ndarray]) -> tuple[float, float, float] | None:
    """``(lowest, highest, cap)`` of the finite values; ``cap`` bounds a shared log scale.

    When one run's values dwarf another's (a run that exploded next to one
    that did not), a shared scale up to the largest would flatten the tame
    run: the scale then stops :data:`_DECADES` decades above the tamest
    run's peak, and what goes beyond is drawn as off the chart.
    """
    finite = [c[np.isfinite(c)] for c in columns]
    values = np.concatenate([f for f in finite if f.size] or [np.array([])])
    if not values.size:
        return None
    low, high = float(values.min()), float(values.max())
    peaks = [float(f.max()) for f in finite if f.size]
    cap = min(high, min(peaks) * 10.0 ** _DECADES) if low > 0 else high
    return low, high, cap


def _shared_scale(axes: Any, columns: list[np.ndarray], also: list[np.ndarray]) -> None:
    """A log scale when the values span more than two decades; capped (see :func:`_range`).

    ``also``: values to keep in view (the threshold) without moving the cap.
    """
    found = _range(columns)
    if found is None:
        return
    low, high, cap = found
    extra = np.concatenate([a[np.isfinite(a)] for a in also] or [np.array([])])
    low = min([low, *extra[extra > 0].tolist()])
    if low <= 0 or high / low <= 100.0:
        return
    axes[0].set_yscale("log")
    if cap < high:
        axes[0].set_ylim(low / 2.0, cap)
        for ax, values in zip(axes, columns):
            top = float(np.nanmax(values)) if np.isfinite(values).any() else math.nan
            if top > cap:
                ax.text(0.99, 0.97, f"off the chart above {cap:.0e}: up to {top:.1e}",
                        transform=ax.transAxes, ha="right", va="top", fontsize=8,
                        color="darkred")


def _heatmaps(axes: Any, steps: list[np.ndarray], grids: list[np.ndarray],
              names: list[str]) -> Any:
    """Draws the heat maps on one colour scale; returns the mesh for the colour bar."""
    from matplotlib.colors import ListedColormap, LogNorm, Normalize
    from matplotlib.patches import Patch

    if not names:
        for ax in axes:
            ax.text(0.5, 0.5, "no per-layer norms recorded", transform=ax.transAxes,
                    ha="center", va="center", color="gray")
            ax.set_yticks([])
        return None, False
    values = np.concatenate([g[np.isfinite(g)] for g in grids])
    found = _range([g[np.isfinite(g) & (g > 0)] for g in grids])
    capped = False
    if found is not None and found[1] / found[0] > 10:
        low, high, cap = found
        norm: Any = LogNorm(vmin=low, vmax=cap)
        capped = cap < high
    else:
        norm = Normalize(vmin=values.min() if values.size else 0.0,
                         vmax=values.max() if values.size else 1.0)
    mesh = None
    labels = short_names(names)
    log = isinstance(norm, LogNorm)
    for col, (ax, grid) in enumerate(zip(axes, grids)):
        if not grid.shape[1]:
            continue
        edges = _edges(steps[col])
        rows = np.arange(len(names) + 1)
        hidden = ~np.isfinite(grid) | ((grid <= 0) if log else np.zeros(grid.shape, bool))
        finite = np.ma.masked_where(hidden, grid)
        mesh = ax.pcolormesh(edges, rows, finite, cmap="magma", norm=norm, shading="flat")
        bad = np.ma.masked_where(~np.isinf(grid), np.ones_like(grid))
        if bad.count():
            ax.pcolormesh(edges, rows, bad, cmap=ListedColormap([_NAN_COLOUR]), shading="flat")
        ax.set_ylim(len(names), 0)
        ax.set_yticks(np.arange(len(names)) + 0.5)
        ax.set_yticklabels(labels if col == 0 else [], fontsize=7 if len(names) > 12 else 8)
        ax.set_facecolor("white")
        ax.set_title("per-layer gradient norm (EMA)", fontsize=9)
    handles = []
    if any(np.isinf(g).any() for g in grids):
        handles.append(Patch(facecolor=_NAN_COLOUR, label="NaN/Inf"))
    if any(np.isnan(g).any() for g in grids):
        handles.append(Patch(facecolor="white", edgecolor="0.6",
                             label="blank: not among the record's top-k layers"))
    if handles:
        axes[-1].legend(handles=handles, loc="upper right", bbox_to_anchor=(1.0, -0.16),
                        ncol=2, fontsize=7, frameon=False)
    return mesh, capped


def _edges(steps: np.ndarray) -> np.ndarray:
    steps = np.asarray(steps, dtype=np.float64)
    if len(steps) == 0:
        return np.array([0.0])
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mids[0] - steps[0])], mids,
                           [steps[-1] + (steps[-1] - mids[-1])]])
