"""``safeopt report RUN.jsonl [RUN2.jsonl ...]``: a picture and a diagnosis of logged runs.

Reads the JSON Lines files runs wrote with ``log_file`` (see
:mod:`safeopt.telemetry`), renders one PNG with the runs side by side on
shared axes (:mod:`safeopt._report_plot`: loss; gradient norm with the
threshold and the clip / skip markers; weight norm; a heat map of the
per-layer gradient norms; NaN/Inf and stopped runs marked) and prints each
run's last diagnosis as text. ``--html`` also writes one self-contained HTML
page with the PNG embedded (base64) and the same text.

Records may hold ``null`` (a NaN/Inf number) anywhere: the picture shows it
as such and the text reads it as ``nan``.

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

from safeopt._diagnosis import Diagnosis
from safeopt._report_data import Run, layer_matrix
from safeopt._report_plot import PlotError, draw

__all__ = ["ReportError", "diagnosis_of", "layer_matrix", "load_records", "render_html",
           "render_png", "render_runs", "report"]


class ReportError(ValueError):
    """The run log cannot be read or rendered."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Reads the records of a JSON Lines run log, in step order.

    Blank lines, and lines that are not records (no numeric ``step``), are
    ignored; ``NaN`` and ``Infinity`` tokens are read as numbers.

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
            if isinstance(rec, dict) and _finite_step(rec.get("step")):
                records.append(rec)
    if not records:
        raise ReportError(
            f"{file} holds no safeopt record. Write one with a policy that sets log_every > 0 "
            "and log_file (e.g. {'log_every': 10, 'log_file': 'run.jsonl'})."
        )
    return sorted(records, key=lambda r: float(r["step"]))


def _finite_step(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def diagnosis_of(records: Sequence[dict[str, Any]]) -> Diagnosis | None:
    """The diagnosis of the last record that carries a readable one."""
    for rec in reversed(records):
        if isinstance(rec.get("diagnosis"), dict):
            try:
                return Diagnosis.from_dict(rec["diagnosis"])
            except (TypeError, ValueError, KeyError):
                continue
    return None


def diagnosis_text(records: Sequence[dict[str, Any]]) -> str:
    """The last diagnosis as text, or why there is none."""
    diagnosis = diagnosis_of(records)
    return str(diagnosis) if diagnosis is not None else "No diagnosis recorded in the log."


def render_png(records: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Draws the four panels of one run into the PNG ``out``.

    Raises:
      ReportError: matplotlib is not installed.
    """
    return render_runs([("", records)], out, title)


def render_runs(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], out: str | Path,
                title: str = "", total: int | None = None) -> Path:
    """Draws ``(label, records)`` runs side by side, on shared axes, into the PNG ``out``.

    Args:
      runs: One ``(label, records)`` per column; each column's title shows
        the verdict of its last diagnosis.
      out: The PNG to write.
      title: The figure's title.
      total: Steps the runs were asked for: a run that ended earlier is
        marked as stopped (default: the longest run's last step).

    Raises:
      ReportError: matplotlib is not installed.
    """
    columns = []
    for label, records in runs:
        d = diagnosis_of(records)
        clipped = d.clipped / d.applied if d is not None and d.applied > 0 else None
        columns.append(Run(label, records, None if d is None else d.verdict, clipped))
    try:
        return draw(columns, out, title, total)
    except PlotError as err:
        raise ReportError(str(err)) from None


def render_html(png: Path, text: str, title: str) -> str:
    """One self-contained HTML page: the PNG inlined as base64 and the diagnosis text."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap;}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<img alt=\"safeopt run report\" style=\"max-width:100%\" "
        f"src=\"data:image/png;base64,{data}\">"
        f"<h2>Diagnosis</h2><pre>{html.escape(text)}</pre></body></html>\n"
    )


def report(run: str | Path | Sequence[str | Path], out: str | Path | None = None,
           html_out: str | Path | None = None) -> tuple[Path, str, Path | None]:
    """Renders the PNG (and HTML page) of one run or several side by side.

    Args:
      run: A JSON Lines run log, or several (one column each).
      out: The PNG (default: the first log with the suffix ``.png``; for
        several, their stems joined by ``_vs_``).
      html_out: The HTML page to write, if any.

    Returns:
      ``(png, diagnosis text, html)``.
    """
    paths = [Path(run)] if isinstance(run, (str, Path)) else [Path(p) for p in run]
    logs = [(p, load_records(p)) for p in paths]
    png = Path(out) if out is not None else _default_png(paths)
    if len(logs) == 1:
        (path, records), = logs
        title = f"safeopt report: {path.name} ({len(records)} records)"
        text = diagnosis_text(records)
    else:
        title = "safeopt report: " + " vs ".join(p.name for p in paths)
        text = "\n\n".join(f"== {p.name} ({len(r)} records) ==\n{diagnosis_text(r)}"
                           for p, r in logs)
    render_runs([(p.stem if len(logs) > 1 else "", r) for p, r in logs], png, title)
    page = None
    if html_out is not None:
        page = Path(html_out)
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(render_html(png, text, title), encoding="utf-8")
    return png, text, page


def _default_png(paths: Sequence[Path]) -> Path:
    if len(paths) == 1:
        return paths[0].with_suffix(".png")
    return paths[0].with_name("_vs_".join(p.stem for p in paths) + ".png")


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------
def add_report_parser(sub: Any) -> None:
    """Adds ``safeopt report`` to the CLI's subparsers."""
    parser = sub.add_parser("report", help="render a PNG (and HTML) report of JSONL run logs, "
                            "side by side, and print their diagnosis")
    parser.add_argument("run", nargs="+", metavar="RUN",
                        help="the JSON Lines file a run wrote with log_file; give two (a bare "
                        "and a wrapped run, say) to see them side by side on shared axes")
    parser.add_argument("-o", "--output", default=None,
                        help="the PNG to write (default: RUN with the suffix .png; for "
                        "several runs, their names joined by _vs_)")
    parser.add_argument("--html", nargs="?", const="", default=None, metavar="PAGE",
                        help="also write a self-contained HTML page (default: the PNG with "
                        "the suffix .html)")
    parser.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    png_path = Path(args.output) if args.output else _default_png([Path(r) for r in args.run])
    page = None
    if args.html is not None:
        page = args.html or str(png_path.with_suffix(".html"))
    try:
        png, text, written = report(args.run, png_path, page)
    except ReportError as err:
        print(f"safeopt report: {err}")
        return 2
    print(text)
    print(f"\nwrote {png}" + (f" and {written}" if written is not None else ""))
    return 0
