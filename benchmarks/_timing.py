"""Side-by-side timing: candidates measured interleaved in one process.

The machines are noisy, so absolute times mean little; what is reported is
each candidate's median step time divided by a baseline's, with the
candidates run round-robin (A B C A B C ...) after a warm-up, so that a slow
spell hits them all alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def interleaved(candidates: Mapping[str, Callable[[], Any]], *, warmup: int = 3,
                rounds: int = 20, sync: Callable[[Any], Any] | None = None,
                inner: int = 1) -> dict[str, float]:
    """Returns the median seconds per call of each candidate, measured interleaved.

    Args:
      candidates: ``name -> step`` callables; each call runs ``inner`` steps.
      warmup: Untimed calls of each candidate first (compilation, caches).
      rounds: Timed round-robin rounds.
      sync: Called on a step's return value before the clock stops (e.g.
        ``jax.block_until_ready`` or ``torch.cuda.synchronize``).
      inner: Steps per call (times are divided by it).
    """
    for fn in candidates.values():
        for _ in range(warmup):
            out = fn()
            if sync is not None:
                sync(out)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in candidates.items():
                start = time.perf_counter()
                out = fn()
                if sync is not None:
                    sync(out)
                samples[name].append((time.perf_counter() - start) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(times) for name, times in samples.items()}


def ratios(medians: Mapping[str, float], baseline: str) -> dict[str, float]:
    """Each median divided by ``medians[baseline]``."""
    base = medians[baseline]
    return {name: value / base for name, value in medians.items()}


def split_sizes(total: int, n_tensors: int) -> list[int]:
    """``n_tensors`` equal sizes summing to about ``total`` elements."""
    each = max(total // n_tensors, 1)
    return [each] * n_tensors


def size_parser(description: str, tensors: int = 200) -> argparse.ArgumentParser:
    """A parser with the usual ``--params``, ``--tensors`` and ``--rounds`` of a cost benchmark."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=float, default=10e6, help="parameters in all")
    parser.add_argument("--tensors", type=int, default=tensors, help="split into this many")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    return parser
