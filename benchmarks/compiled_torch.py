"""Compiled steps: the protected step under ``torch.compile`` against the bare compiled step.

Candidates, interleaved in one process after compiling (each on its own
parameters and gradients of the same shapes, AdamW):

- ``bare``: the bare step, eager (``fused=True``);
- ``compiled bare``: ``torch.compile(opt.step)`` of the bare optimizer, the
  way torch compiles its optimizers (``foreach=True``: torch does not trace
  its fused kernels; the step's own graph breaks at its edges);
- ``compiled safeopt``: ``torch.compile(fullgraph=True)`` of the wrapped
  step, decided on the device (``decide_on="device"``), gradients that clip.

The eager protected step stays the default; this measures what compiling it
gives. Run: ``python -m safeopt_bench.compiled_torch [--params N] [--tensors K]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

import safeopt
from safeopt_bench._timing import interleaved, ratios, split_sizes
from safeopt_bench.overhead_torch import POLICY, _params
from safeopt_torch import SafeOptimizer


def candidates(total: int, n_tensors: int, device: str = "cpu") -> dict[str, Callable[[], Any]]:
    """The three steps, compiled ones warmed up (compiled) by :func:`interleaved`'s warm-up."""
    sizes = split_sizes(total, n_tensors)
    bare = torch.optim.AdamW(_params(sizes, device, 0), lr=1e-4, fused=True)
    compiled_bare_opt = torch.optim.AdamW(_params(sizes, device, 0), lr=1e-4, foreach=True)
    wrapped = SafeOptimizer(torch.optim.AdamW(_params(sizes, device, 0), lr=1e-4, foreach=True),
                            safeopt.load_policy(POLICY), decide_on="device")
    wrapped.step()  # the inner state exists before compiling
    compiled_bare = torch.compile(compiled_bare_opt.step)
    compiled_safe = torch.compile(wrapped.step, fullgraph=True)
    return {"bare": bare.step, "compiled bare": compiled_bare,
            "compiled safeopt": compiled_safe}


def measure(total: int, n_tensors: int, rounds: int = 20) -> dict[str, float]:
    """Median step times as ratios to the eager bare step."""
    medians = interleaved(candidates(total, n_tensors), warmup=3, rounds=rounds)
    out = ratios(medians, "bare")
    out["compiled safeopt / compiled bare"] = (medians["compiled safeopt"]
                                               / medians["compiled bare"])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the ratios for each tensor count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--tensors", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    for n in args.tensors:
        cells = ", ".join(f"{k} {v:.3f}x" for k, v in measure(args.params, n,
                                                               args.rounds).items())
        print(f"torch {args.params:,} params in {n} tensors: {cells}", flush=True)


if __name__ == "__main__":
    main()
