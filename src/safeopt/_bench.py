"""Command-line glue of ``safeopt demo`` and ``safeopt bench``.

Both commands import their framework (and the ``safeopt_bench`` package,
installed with safeopt from ``benchmarks/``) only when they run, so
``import safeopt`` and ``safeopt --help`` stay framework-free.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

_FRAMEWORKS = ("torch", "jax", "keras")
# safeopt_bench.stability.TASKS
_STABILITY_TASKS = ("mlp", "rnn", "addition", "temporal_order", "lm", "lm-episode")


def add_demo_parser(sub: Any) -> None:
    """Adds ``safeopt demo`` to the subcommands ``sub``."""
    demo = sub.add_parser(
        "demo", help="train models with exploding gradients, bare and wrapped, side by side",
        description="Trains a deep tanh MLP with large initial weights and a vanilla RNN on the "
        "addition problem twice (bare, then wrapped by safeopt with the default policy), prints "
        "a side-by-side table and the diagnosis, and writes the telemetry and report PNGs.")
    demo.add_argument("--framework", choices=_FRAMEWORKS, default=None,
                      help="default: the first installed of torch, jax, keras")
    demo.add_argument("--out", default="safeopt-demo", help="directory for the files "
                      "(default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="data and init seed (default: 0)")
    demo.add_argument("--no-report", action="store_true", help="do not render the PNGs")
    demo.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        run_demo = importlib.import_module("safeopt_bench.demo").run_demo
    except ImportError as err:
        print(f"safeopt demo: the benchmarks package is not installed ({err}); install "
              "safeopt from its source tree (pip install .).")
        return 2
    try:
        run_demo(args.framework, args.out, steps=args.steps, seed=args.seed,
                 report=not args.no_report)
    except RuntimeError as err:
        print(f"safeopt demo: {err}")
        return 2
    return 0


def add_bench_parser(sub: Any) -> None:
    """Adds ``safeopt bench`` to the subcommands ``sub``."""
    bench = sub.add_parser(
        "bench", help="measure safeopt's overhead (or, with --stability, what it saves)",
        description="Overhead: median step time of the wrapped optimizer over the bare one and "
        "over the native alternatives, per installed framework, at 1M/10M/50M parameters in "
        "10/200/1000 tensors, measured interleaved in one process. With --stability: success "
        "rate over seeds of no protection, native clipping and safeopt on explosive tasks and "
        "the RNN problems of Pascanu et al. (2013), and runs with NaN, loss spikes and final "
        "validation loss of a small transformer trained on the Python standard library's "
        "source at a high learning rate (task lm), in torch.")
    bench.add_argument("--stability", action="store_true",
                       help="run the stability benchmark instead of the overhead one")
    bench.add_argument("--quick", action="store_true",
                       help="a reduced run for CI (minutes)")
    bench.add_argument("--tasks", nargs="+", choices=_STABILITY_TASKS, default=None,
                       help="stability: the tasks to run (default: all of them; lm is the "
                       "language model, lm-episode the same model meeting corrupt data)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--frameworks", nargs="+", choices=_FRAMEWORKS, default=None,
                       help="overhead: frameworks to measure (default: every installed one)")
    bench.add_argument("--out", default="safeopt-bench", help="directory for the Markdown, "
                       "JSON and PNG files (default: %(default)s)")
    # Hidden knobs for fast smoke tests; the real commands use the defaults.
    bench.add_argument("--params", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    bench.add_argument("--tensors", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    bench.add_argument("--rounds", type=int, default=None, help=argparse.SUPPRESS)
    bench.add_argument("--seeds", type=int, default=None, help=argparse.SUPPRESS)
    bench.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    bench.add_argument("--lengths", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    name = "stability" if args.stability else "overhead"
    try:
        module: Any = importlib.import_module(f"safeopt_bench.{name}")
    except ImportError as err:
        print(f"safeopt bench: the benchmarks package is not installed ({err}); install "
              "safeopt from its source tree (pip install .).")
        return 2
    return int(module.run_cli(args))
