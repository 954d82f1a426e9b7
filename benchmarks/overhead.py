"""Overhead benchmark: what safeopt costs per step, in every installed framework.

Runs each installed framework's overhead module (``overhead_torch``: fused
AdamW against ``clip_grad_norm_`` + step; ``overhead_optax``: ``adamw``
against ``chain(clip_by_global_norm, adamw)`` and ``apply_if_finite``;
``overhead_keras``: ``model.fit`` against ``global_clipnorm``) at 1M, 10M and
50M parameters split into 10, 200 and 1000 tensors of equal size (Keras: an
MLP of the given size, 3 hidden layers). Inside a module every candidate is
measured in one process, interleaved, after a warm-up
(:func:`safeopt_bench._timing.interleaved`). Writes ``overhead.md``,
``overhead.json`` and ``overhead.png`` (needs matplotlib).

Run:
  python -m safeopt_bench.overhead [--quick] [--device cuda]
  safeopt bench [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SIZES: tuple[int, ...] = (1_000_000, 10_000_000, 50_000_000)
TENSORS: tuple[int, ...] = (10, 200, 1000)
FRAMEWORKS: tuple[str, ...] = ("torch", "optax", "keras")
_REQUIRES = {"torch": ("torch",), "optax": ("jax", "optax"), "keras": ("keras",)}
FULL: dict[str, Any] = {"frameworks": FRAMEWORKS, "sizes": SIZES, "tensors": TENSORS,
                        "rounds": 20}
QUICK: dict[str, Any] = {"frameworks": ("torch",), "sizes": (10_000_000,), "tensors": (10, 1000),
                         "rounds": 20}
#: Column names of the torch module's wide rows, by candidate.
_TORCH_COLUMNS = {"bare_ms": "bare", "safeopt_ms": "safeopt",
                  "safeopt_steady_ms": "safeopt, norm under clip_norm",
                  "clip_grad_norm_ms": "clip_grad_norm_+step",
                  "zclip_ms": "zclip+step", "smartclip_ms": "smartclip.step(ZScoreClip)"}


def installed(framework: str) -> bool:
    """Whether the modules a framework's benchmark needs are importable."""
    return all(importlib.util.find_spec(m) is not None for m in _REQUIRES[framework])


# ---------------------------------------------------------------------------
# Per-framework drivers: each returns long rows
# {framework, device, params, tensors, candidate, median_ms}.
# ---------------------------------------------------------------------------
def _torch_rows(total: int, tensors: Sequence[int], device: str,
                rounds: int) -> list[dict[str, Any]]:
    from safeopt_bench import overhead_torch

    out = []
    for row in overhead_torch.rows(total, tuple(tensors), device, rounds):
        for column, candidate in _TORCH_COLUMNS.items():
            if column in row:
                out.append({"framework": "torch", "device": device, "params": total,
                            "tensors": row["tensors"], "candidate": candidate,
                            "median_ms": row[column]})
    return out


def _optax_rows(total: int, tensors: Sequence[int], device: str,
                rounds: int) -> list[dict[str, Any]]:
    from safeopt_bench import overhead_optax

    layouts = tuple((n, f"{n} tensors") for n in tensors)
    out = []
    for row in overhead_optax.run(total, layouts=layouts, rounds=rounds):
        out.append({"framework": "optax", "device": device, "params": total,
                    "tensors": row["tensors"], "candidate": _optax_name(row["candidate"]),
                    "median_ms": row["median_ms"]})
    return out


def _optax_name(name: str) -> str:
    return {"chain_clip": "chain(clip_by_global_norm)",
            "apply_if_finite": "apply_if_finite(chain(clip))"}.get(name, name)


def _keras_rows(total: int, tensors: Sequence[int], device: str,
                rounds: int) -> list[dict[str, Any]]:
    from safeopt_bench import overhead_keras

    depth = 3
    width = max(int(math.sqrt(total / depth)), 8)
    out = []
    for row in overhead_keras.run(width=width, depth=depth, rounds=max(rounds // 3, 3)):
        out.append({"framework": "keras-tensorflow", "device": device,
                    "params": row["params"], "tensors": 2 * (depth + 1),
                    "candidate": row["candidate"], "median_ms": row["ms_per_step"]})
    return out


_DRIVERS: dict[str, Callable[[int, Sequence[int], str, int], list[dict[str, Any]]]] = {
    "torch": _torch_rows, "optax": _optax_rows, "keras": _keras_rows}


def rows(frameworks: Sequence[str] = FRAMEWORKS, sizes: Sequence[int] = SIZES,
         tensors: Sequence[int] = TENSORS, device: str = "cpu", rounds: int = 20,
         progress: bool = True) -> list[dict[str, Any]]:
    """Measures every installed framework at every size; returns long rows.

    Keras is measured once per size (its benchmark is a ``model.fit`` of an
    MLP, whose tensor count is fixed by its depth).
    """
    out: list[dict[str, Any]] = []
    for framework in frameworks:
        if not installed(framework):
            _say(progress, f"{framework}: not installed, skipped")
            continue
        for total in sizes:
            start = time.perf_counter()
            out.extend(_DRIVERS[framework](total, tensors, device, rounds))
            _say(progress, f"{framework}: {total:,} params done "
                 f"({time.perf_counter() - start:.0f} s)")
    return out


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Ratios and output.
# ---------------------------------------------------------------------------
def summarize(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (framework, params, tensors): safeopt over bare and over each alternative."""
    groups: dict[tuple[str, str, int, int], dict[str, float]] = {}
    for r in table:
        key = (r["framework"], r["device"], r["params"], r["tensors"])
        groups.setdefault(key, {})[r["candidate"]] = r["median_ms"]
    out = []
    for (framework, device, params, tensors), ms in groups.items():
        safe = ms.get("safeopt", math.nan)
        line: dict[str, Any] = {"framework": framework, "device": device, "params": params,
                                "tensors": tensors, "bare_ms": ms.get("bare", math.nan),
                                "safeopt_ms": safe, "safeopt_x_bare": safe / ms["bare"]
                                if "bare" in ms else math.nan, "vs": {}}
        for name, value in ms.items():
            if name not in ("bare", "safeopt"):
                line["vs"][name] = {"x_bare": value / ms["bare"] if "bare" in ms else math.nan,
                                    "safeopt_over": safe / value}
        out.append(line)
    return out


def growth(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """safeopt/bare at the most tensors divided by safeopt/bare at the fewest, per size."""
    out = []
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in summary:
        by.setdefault((s["framework"], s["params"]), []).append(s)
    for (framework, params), lines in by.items():
        if len(lines) < 2:
            continue
        lines = sorted(lines, key=lambda s: s["tensors"])
        out.append({"framework": framework, "params": params, "from": lines[0]["tensors"],
                    "to": lines[-1]["tensors"],
                    "growth": lines[-1]["safeopt_x_bare"] / lines[0]["safeopt_x_bare"]})
    return out


def markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (ratios: < 1 means safeopt is faster)."""
    lines = ["| framework | device | params | tensors | bare ms/step | safeopt / bare "
             "| alternative | alternative / bare | safeopt / alternative |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for s in summary:
        first = (f"| {s['framework']} | {s['device']} | {s['params'] / 1e6:g}M | {s['tensors']} "
                 f"| {s['bare_ms']:.2f} | {s['safeopt_x_bare']:.3f}x ")
        alternatives = list(s["vs"].items()) or [("-", None)]
        for i, (name, v) in enumerate(alternatives):
            lead = first if i == 0 else "| | | | | | "
            rest = ("| - | - | - |" if v is None else
                    f"| {name} | {v['x_bare']:.3f}x | {v['safeopt_over']:.3f}x |")
            lines.append(lead + rest)
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """safeopt / bare against the tensor count, one line per size; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    frameworks = sorted({s["framework"] for s in summary})
    fig, axes = plt.subplots(1, max(len(frameworks), 1), figsize=(5 * max(len(frameworks), 1), 4),
                             squeeze=False)
    for ax, framework in zip(axes[0], frameworks):
        lines = [s for s in summary if s["framework"] == framework]
        for params in sorted({s["params"] for s in lines}):
            pts = sorted((s["tensors"], s["safeopt_x_bare"]) for s in lines
                         if s["params"] == params)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                    label=f"safeopt, {params / 1e6:g}M")
            for alt in sorted({a for s in lines for a in s["vs"]}):
                apts = sorted((s["tensors"], s["vs"][alt]["x_bare"]) for s in lines
                              if s["params"] == params and alt in s["vs"])
                ax.plot([p[0] for p in apts], [p[1] for p in apts], "x--", alpha=0.6,
                        label=f"{alt}, {params / 1e6:g}M")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("parameter tensors")
        ax.set_ylabel("step time / bare step")
        ax.set_title(framework)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def header(settings: dict[str, Any], seconds: float, command: str, device: str) -> str:
    """Date, machine and command, for the README."""
    return (f"Measured {_dt.date.today().isoformat()} on {platform.machine()} "
            f"({platform.processor() or platform.platform()}), device {device}, with "
            f"`{command}`: sizes {[f'{s / 1e6:g}M' for s in settings['sizes']]}, tensors "
            f"{list(settings['tensors'])}, {settings['rounds']} interleaved rounds; run time "
            f"{seconds / 60:.1f} min. Ratios are median step times; below 1.0 is faster.")


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """``FULL`` or ``QUICK``, with the hidden overrides of the smoke tests."""
    settings = dict(QUICK if args.quick else FULL)
    if getattr(args, "frameworks", None):
        settings["frameworks"] = tuple("optax" if f == "jax" else f for f in args.frameworks)
    if getattr(args, "params", None):
        settings["sizes"] = tuple(args.params)
    if getattr(args, "tensors", None):
        settings["tensors"] = tuple(args.tensors)
    if getattr(args, "rounds", None):
        settings["rounds"] = args.rounds
    return settings


def run_cli(args: argparse.Namespace) -> int:
    """What ``safeopt bench`` runs: measure, then write Markdown, JSON and PNG."""
    settings = settings_from(args)
    command = "safeopt bench" + (" --quick" if args.quick else "") + (
        f" --device {args.device}" if args.device != "cpu" else "")
    start = time.perf_counter()
    table = rows(settings["frameworks"], settings["sizes"], settings["tensors"], args.device,
                 settings["rounds"])
    seconds = time.perf_counter() - start
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(table)
    grow = growth(summary)
    text = header(settings, seconds, command, args.device) + "\n\n" + markdown(summary) + "\n"
    if grow:
        text += "\nCost growth with the tensor count (safeopt/bare at the most tensors over the "
        text += "fewest): " + ", ".join(f"{g['framework']} {g['params'] / 1e6:g}M: "
                                        f"{g['growth']:.2f}x" for g in grow) + "\n"
    md = out_dir / "overhead.md"
    md.write_text(text, encoding="utf-8")
    js = out_dir / "overhead.json"
    js.write_text(json.dumps({"settings": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in settings.items()},
                              "device": args.device, "seconds": seconds, "command": command,
                              "summary": summary, "growth": grow, "rows": table}, indent=2),
                  encoding="utf-8")
    png = plot(summary, out_dir / "overhead.png")
    print(text)
    print(f"wrote {md}, {js}" + (f", {png}" if png else " (no PNG: pip install matplotlib)"))
    return 0 if table else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safeopt_bench.overhead``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frameworks", nargs="+", default=None)
    parser.add_argument("--out", default="safeopt-bench")
    parser.add_argument("--params", type=int, nargs="+", default=None)
    parser.add_argument("--tensors", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
