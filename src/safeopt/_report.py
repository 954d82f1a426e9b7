"""``safeopt report RUN.jsonl``: a picture and a diagnosis of a logged run.

Reads the JSON Lines file a run wrote with ``log_file`` (see
:mod:`safeopt._telemetry`), renders one PNG with four panels (loss;
gradient norm with the threshold and the clip / skip markers; weight norm;
a heat map of the per-layer gradient norms) and prints the run's last
diagnosis as text. ``--html`` also writes one self-contained HTML page with
the PNG embedded (base64) and the same text.

matplotlib is needed only here: ``pip install 'safeopt[report]'``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from safeopt._diagnosis import Diagnosis


class ReportError(ValueError):
    """The run log cannot be read or rendered."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Reads the records of a JSON Lines run log (blank lines are ignored).

    Raises:
      ReportError: the file is missing, a line is not JSON, or no line is a record.
    """
    file = Path(path)
    if not file.is_file():
        raise ReportError(f"`RUN.jsonl` must be an existing file. Received: {str(path)!r}")
    records = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ReportError(f"{file}:{number} is not JSON ({err}).") from None
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
    if not records:
        raise ReportError(
            f"{file} holds no safeopt record. Write one with a policy that sets log_every > 0 "
            "and log_file (e.g. {'log_every': 10, 'log_file': 'run.jsonl'})."
        )
    return records


def diagnosis_of(records: Sequence[dict[str, Any]]) -> Diagnosis | None:
    """The diagnosis of the last record that carries one."""
    for rec in reversed(records):
        if isinstance(rec.get("diagnosis"), dict):
            return Diagnosis.from_dict(rec["diagnosis"])
    return None


def _series(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([math.nan if r.get(key) is None else float(r[key]) for r in records])


def _increments(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    values = np.array([int(r.get(key) or 0) for r in records])
    return np.diff(values, prepend=0) > 0


def layer_matrix(records: Sequence[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """``(layer names, norms[layer, record])`` from the records' top-k layers (NaN: not listed).

    Layers are ordered by their largest norm, largest first.
    """
    names: list[str] = []
    for rec in records:
        for name in rec.get("layers") or {}:
            if name not in names:
                names.append(name)
    grid = np.full((len(names), len(records)), np.nan)
    index = {n: i for i, n in enumerate(names)}
    for j, rec in enumerate(records):
        for name, value in (rec.get("layers") or {}).items():
            if value is not None:
                grid[index[name], j] = float(value)
    if names:
        peak = np.nan_to_num(np.nanmax(np.where(np.isnan(grid), -np.inf, grid), axis=1),
                             neginf=-1.0)
        order = np.argsort(-peak, kind="stable")
        names = [names[i] for i in order]
        grid = grid[order]
    return names, grid


def render_png(records: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Draws the four panels of ``records`` into the PNG ``out``.

    Raises:
      ReportError: matplotlib is not installed.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    steps = _series(records, "step")
    names, grid = layer_matrix(records)
    height = 9.0 + 0.12 * max(len(names) - 12, 0)
    fig, axes = plt.subplots(4, 1, figsize=(10, height), layout="constrained",
                             gridspec_kw={"height_ratios": [1, 1.2, 1, 1.4]})
    _plot_line(axes[0], steps, _series(records, "loss"), "loss", "tab:blue")
    _plot_grad_norm(axes[1], records, steps)
    _plot_line(axes[2], steps, _series(records, "weight_norm"), "weight norm", "tab:green")
    _plot_heatmap(fig, axes, steps, names, grid, LogNorm)
    edges = _edges(steps)
    for ax in axes:
        ax.set_xlim(float(edges[0]), float(edges[-1]))
    fig.suptitle(title or "safeopt run report", fontsize=12)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            "safeopt report needs matplotlib: pip install 'safeopt[report]'"
        ) from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _log_if_wide(ax: Any, values: np.ndarray, ratio: float = 100.0) -> None:
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > ratio:
        ax.set_yscale("log")


def _plot_line(ax: Any, steps: np.ndarray, values: np.ndarray, label: str, color: str) -> None:
    ax.plot(steps, values, color=color, lw=1.2, marker="." if len(steps) < 60 else None)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if not np.isfinite(values).any():
        ax.text(0.5, 0.5, f"no {label} recorded", transform=ax.transAxes, ha="center",
                va="center", color="gray")
    _log_if_wide(ax, values)


def _plot_grad_norm(ax: Any, records: Sequence[dict[str, Any]], steps: np.ndarray) -> None:
    norm = _series(records, "grad_norm")
    threshold = _series(records, "threshold")
    ax.plot(steps, norm, color="tab:purple", lw=1.2, label="grad norm (pre-clip)")
    if np.isfinite(threshold).any():
        ax.step(steps, threshold, where="post", color="black", ls="--", lw=1, label="threshold")
    clipped = _increments(records, "norm_clips")
    skipped = _increments(records, "skips")
    if clipped.any():
        ax.scatter(steps[clipped], np.where(np.isfinite(norm), norm, np.nan)[clipped],
                   color="tab:orange", s=18, zorder=3, label="clipped in interval")
    for k, s in enumerate(steps[skipped]):
        ax.axvline(s, color="red", alpha=0.35, lw=1, label="skipped in interval" if k == 0
                   else None)
    ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3)
    _log_if_wide(ax, np.concatenate([norm, threshold]), ratio=10.0)
    ax.legend(loc="upper left", fontsize=8, ncol=4)


def _plot_heatmap(fig: Any, axes: Any, steps: np.ndarray, names: list[str], grid: np.ndarray,
                  log_norm: Any) -> None:
    ax = axes[-1]
    ax.set_xlabel("step")
    if not names:
        ax.text(0.5, 0.5, "no per-layer norms recorded", transform=ax.transAxes, ha="center",
                va="center", color="gray")
        ax.set_yticks([])
        return
    values = np.ma.masked_invalid(grid)
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = None
    if positive.size and positive.max() / positive.min() > 10:
        norm = log_norm(vmin=positive.min(), vmax=positive.max())
    edges = _edges(steps)
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), values, cmap="magma", norm=norm,
                         shading="flat")
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(names, fontsize=7 if len(names) > 12 else 8)
    ax.invert_yaxis()
    ax.set_ylabel("layer")
    ax.set_title("per-layer gradient norm (EMA; blank: not among the top-k of that record)",
                 fontsize=9)
    fig.colorbar(mesh, ax=list(axes), pad=0.01, fraction=0.03, aspect=60,
                 label="layer gradient norm")


def _edges(steps: np.ndarray) -> np.ndarray:
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mids[0] - steps[0])], mids,
                           [steps[-1] + (steps[-1] - mids[-1])]])


def render_html(png: Path, text: str, title: str) -> str:
    """One self-contained HTML page: the PNG inlined as base64 and the diagnosis text."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap;}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<img alt=\"safeopt run report\" style=\"max-width:100%\" "
        f"src=\"data:image/png;base64,{data}\">"
        f"<h2>Diagnosis</h2><pre>{html.escape(text)}</pre></body></html>\n"
    )


def report(run: str | Path, out: str | Path | None = None,
           html_out: str | Path | None = None) -> tuple[Path, str, Path | None]:
    """Renders ``run``'s PNG (and HTML page); returns ``(png, diagnosis text, html)``."""
    records = load_records(run)
    run_path = Path(run)
    png = Path(out) if out is not None else run_path.with_suffix(".png")
    title = f"safeopt report: {run_path.name} ({len(records)} records)"
    render_png(records, png, title)
    diagnosis = diagnosis_of(records)
    text = str(diagnosis) if diagnosis is not None else "No diagnosis recorded in the log."
    page = None
    if html_out is not None:
        page = Path(html_out)
        page.write_text(render_html(png, text, title), encoding="utf-8")
    return png, text, page


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------
def add_report_parser(sub: Any) -> None:
    """Adds ``safeopt report`` to the CLI's subparsers."""
    parser = sub.add_parser("report", help="render a PNG (and HTML) report of a JSONL run log "
                            "and print its diagnosis")
    parser.add_argument("run", help="the JSON Lines file a run wrote with log_file")
    parser.add_argument("-o", "--output", default=None,
                        help="the PNG to write (default: RUN with the suffix .png)")
    parser.add_argument("--html", nargs="?", const="", default=None, metavar="PAGE",
                        help="also write a self-contained HTML page (default: RUN with the "
                        "suffix .html)")
    parser.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    page = None
    if args.html is not None:
        page = args.html or str(Path(args.run).with_suffix(".html"))
    try:
        png, text, written = report(args.run, args.output, page)
    except ReportError as err:
        print(f"safeopt report: {err}")
        return 2
    print(text)
    print(f"\nwrote {png}" + (f" and {written}" if written is not None else ""))
    return 0
