"""What ``recover=True`` costs the torch wrapper: time per step and snapshot memory.

Candidates measured interleaved in one process
(:func:`safeopt_bench._timing.interleaved`), fused AdamW over parameters and
gradients of the same shapes, none of which clips:

- ``bare``: ``AdamW(fused=True).step()``;
- ``safeopt``: the wrapper with the default policy;
- ``recover``: the same with ``recover=True`` (a snapshot every
  ``snapshot_every`` = 100 updates: the cost of an ordinary step);
- ``snapshot every step``: ``snapshot_every=1``, what one snapshot costs;
- ``restore every step``: NaN gradients on every step with
  ``max_consecutive_skips=1``, so that every step restores the snapshot
  (what one restore costs).

The snapshot lives in host memory: one copy of the parameters and of the
inner optimizer's per-parameter state (AdamW: three times the parameters).

Run: ``python -m safeopt_bench.recovery_cost`` (``--params``, ``--tensors``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

import safeopt
from safeopt_bench._timing import interleaved, ratios, size_parser, split_sizes

RECOVER = {"recover": True, "clip_norm": 1.0}


def _wrapped(sizes: list[int], policy: dict[str, Any] | None,
             nan: bool = False) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for size in sizes:
        p = torch.nn.Parameter(torch.randn(size, generator=gen))
        p.grad = torch.randn(size, generator=gen) * (0.1 / sum(sizes) ** 0.5)
        if nan:
            p.grad[0] = math.nan
        params.append(p)
    inner = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return (inner if policy is None else safeopt.wrap(inner, policy)), params


def candidates(total: int, n_tensors: int) -> dict[str, Callable[[], Any]]:
    """``name -> step`` for every candidate (see the module docstring)."""
    sizes = split_sizes(total, n_tensors)
    out: dict[str, Callable[[], Any]] = {}
    for name, policy in (("bare", None), ("safeopt", {}), ("recover", RECOVER),
                         ("snapshot every step", {**RECOVER, "snapshot_every": 1})):
        opt, _ = _wrapped(sizes, policy)
        out[name] = opt.step
    healthy, params = _wrapped(sizes, {**RECOVER, "snapshot_every": 1,
                                       "max_consecutive_skips": 1, "max_recoveries": 10 ** 9})
    healthy.step()  # the snapshot before update 0; from now on every gradient is NaN
    for p in params:
        assert p.grad is not None
        p.grad[0] = math.nan
    out["restore every step"] = healthy.step
    return out


def snapshot_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of host memory one snapshot of ``opt`` holds (parameters + per-parameter state)."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            total += p.numel() * p.element_size()
            for value in opt.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Prints each candidate's median step time over ``bare``; returns the ratios."""
    args = size_parser(__doc__.splitlines()[0]).parse_args(argv)
    total = int(args.params)
    medians = interleaved(candidates(total, args.tensors), rounds=args.rounds)
    out = ratios(medians, "bare")
    print(f"torch {torch.__version__}, fused AdamW, {total / 1e6:g}M parameters in "
          f"{args.tensors} tensors, {args.rounds} interleaved rounds (median step / bare):")
    for name, ratio in out.items():
        print(f"  {name:<22} {medians[name] * 1e3:8.2f} ms  {ratio:6.3f}x")
    probe, _ = _wrapped(split_sizes(total, args.tensors), None)
    probe.step()
    print(f"snapshot memory (host): {snapshot_bytes(probe) / 2 ** 20:.1f} MiB "
          f"(parameters {total * 4 / 2 ** 20:.1f} MiB + AdamW state)")
    return out


if __name__ == "__main__":
    main()
