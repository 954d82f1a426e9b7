"""Overhead of the torch wrapper on a fused AdamW step.

Three candidates, measured interleaved in one process
(:func:`safeopt_bench._timing.interleaved`) over the same parameters and
gradients:

- ``bare``: ``AdamW(fused=True).step()``;
- ``safeopt``: the same optimizer wrapped with
  ``{"clip_norm": 1.0, "skip_nonfinite": True}`` (the fused path: scale and
  skip go to the kernel as ``grad_scale`` / ``found_inf``);
- ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_(params, 1.0)``
  followed by the bare step.

The gradients are set once (large enough that every wrapped step clips) and
not regenerated between steps, so only the optimizer step is timed. The
wrapped step costs, on top of the bare one, one read of the gradients (the
foreach norm) and, because torch's fused kernels write the unscaled gradient
back when they are given a ``grad_scale``, one write of them; plus a fixed
per-step cost (grouping, the decision on 0-d tensors, the kernel's
``found_inf`` step-counter rollback) that matters only for small models.

Target (issue 3): ``safeopt`` at most 1.25x ``bare`` and below
``clip_grad_norm_``. Run: ``python -m safeopt_bench.overhead_torch``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

import safeopt
from safeopt_bench._timing import interleaved, ratios, split_sizes

POLICY = {"clip_norm": 1.0, "skip_nonfinite": True}


def _params(sizes: Sequence[int], device: str, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for size in sizes:
        p = torch.nn.Parameter(torch.randn(size, generator=gen).to(device))
        p.grad = (torch.randn(size, generator=gen) * 10.0).to(device)  # clipped every step
        params.append(p)
    return params


def _candidates(total: int, n_tensors: int, device: str) -> dict[str, Callable[[], Any]]:
    sizes = split_sizes(total, n_tensors)
    bare_params = _params(sizes, device, 0)
    safe_params = _params(sizes, device, 0)
    clip_params = _params(sizes, device, 0)
    bare = torch.optim.AdamW(bare_params, lr=1e-4, fused=True)
    safe = safeopt.wrap(torch.optim.AdamW(safe_params, lr=1e-4, fused=True), POLICY)
    assert safeopt.stats(safe)["path"] == "fused"
    clip = torch.optim.AdamW(clip_params, lr=1e-4, fused=True)

    def clip_step() -> None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
        clip.step()

    return {"bare": bare.step, "safeopt": safe.step, "clip_grad_norm_": clip_step}


def measure(total: int = 10_000_000, n_tensors: int = 10, device: str = "cpu",
            rounds: int = 30, warmup: int = 3) -> dict[str, Any]:
    """One row: median step times and ratios to ``bare`` at one size and tensor count.

    Args:
      total: Total number of parameters.
      n_tensors: Number of parameter tensors (equal sizes).
      device: ``"cpu"`` or ``"cuda"``.
      rounds: Timed round-robin rounds.
      warmup: Untimed calls of each candidate first.
    """
    sync = (lambda _: torch.cuda.synchronize()) if device.startswith("cuda") else None
    medians = interleaved(_candidates(total, n_tensors, device), warmup=warmup,
                          rounds=rounds, sync=sync)
    rel = ratios(medians, "bare")
    return {
        "framework": "torch", "device": device, "optimizer": "AdamW(fused=True)",
        "params": total, "tensors": n_tensors,
        "bare_ms": medians["bare"] * 1e3, "safeopt_ms": medians["safeopt"] * 1e3,
        "clip_grad_norm_ms": medians["clip_grad_norm_"] * 1e3,
        "safeopt_x": rel["safeopt"], "clip_grad_norm_x": rel["clip_grad_norm_"],
    }


def rows(total: int = 10_000_000, tensor_counts: Sequence[int] = (10, 200, 1000),
         device: str = "cpu", rounds: int = 30) -> list[dict[str, Any]]:
    """Rows of :func:`measure` for each tensor count (what ``safeopt bench`` calls)."""
    return [measure(total, n, device, rounds) for n in tensor_counts]


def markdown(table: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    head = ("| device | params | tensors | bare ms | safeopt ms | clip_grad_norm_+step ms "
            "| safeopt / bare | clip_grad_norm_ / bare |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in table:
        lines.append(
            f"| {r['device']} | {r['params']:,} | {r['tensors']} | {r['bare_ms']:.2f} "
            f"| {r['safeopt_ms']:.2f} | {r['clip_grad_norm_ms']:.2f} "
            f"| {r['safeopt_x']:.3f}x | {r['clip_grad_norm_x']:.3f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--tensors", type=int, nargs="+", default=[10, 200, 1000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is steadier on "
                             "a shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(markdown(rows(args.params, args.tensors, args.device, args.rounds)))


if __name__ == "__main__":
    main()
