"""Overhead of the torch wrapper on a fused AdamW step.

Four candidates (more with the peers), measured interleaved in one process
(:func:`safeopt_bench._timing.interleaved`) over parameters and gradients of
the same shapes:

- ``bare``: ``AdamW(fused=True).step()``;
- ``safeopt``: the same optimizer wrapped with
  ``{"clip_norm": 1.0, "skip_nonfinite": True}``, with gradients large
  enough that every step clips;
- ``safeopt_steady``: the same wrapper with gradients whose norm stays
  under ``clip_norm`` (the steady state of a healthy run);
- ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_(params, 1.0)``
  followed by the bare step;
- the third-party peers, when installed: ``zclip`` and ``smartclip`` (see
  :func:`_peers`).

The gradients are set once and not regenerated between steps, so only the
optimizer step is timed. The wrapped step costs, on top of the bare one, one
read of the gradients (the norm) and the decision. On an accelerator the
clip scale and the skip flag always go to the kernel as ``grad_scale`` /
``found_inf``, and the kernel then writes the unscaled gradients back (one
more write of them). On CPU the decision is taken on the host, so the kernel
gets ``grad_scale`` only on the steps that clip: ``safeopt_steady`` shows
what a step costs when there is nothing to clip.

Target (issue 3): ``safeopt`` at most 1.25x ``bare`` and below
``clip_grad_norm_``. Run: ``python -m safeopt_bench.overhead_torch``;
``--decompose`` shows where the CPU step's time goes (:func:`decompose`).
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch

import safeopt
from safeopt_bench._timing import interleaved, ratios, split_sizes

POLICY = {"clip_norm": 1.0, "skip_nonfinite": True}
#: Third-party peers measured when installed (see :func:`_peers`).
PEERS = ("zclip", "smartclip")


def _params(sizes: Sequence[int], device: str, seed: int,
            grad_std: float = 10.0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for size in sizes:
        p = torch.nn.Parameter(torch.randn(size, generator=gen).to(device))
        p.grad = (torch.randn(size, generator=gen) * grad_std).to(device)
        params.append(p)
    return params


def _candidates(total: int, n_tensors: int, device: str) -> dict[str, Callable[[], Any]]:
    sizes = split_sizes(total, n_tensors)
    bare_params = _params(sizes, device, 0)
    safe_params = _params(sizes, device, 0)  # global norm ~10 * sqrt(total): clips
    steady_params = _params(sizes, device, 0, grad_std=0.1 / total ** 0.5)  # norm ~0.1
    clip_params = _params(sizes, device, 0)
    bare = torch.optim.AdamW(bare_params, lr=1e-4, fused=True)
    safe = safeopt.wrap(torch.optim.AdamW(safe_params, lr=1e-4, fused=True), POLICY)
    steady = safeopt.wrap(torch.optim.AdamW(steady_params, lr=1e-4, fused=True), POLICY)
    assert safeopt.stats(safe)["path"] == "fused"
    clip = torch.optim.AdamW(clip_params, lr=1e-4, fused=True)

    def clip_step() -> None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
        clip.step()

    out = {"bare": bare.step, "safeopt": safe.step, "safeopt_steady": steady.step,
           "clip_grad_norm_": clip_step}
    out.update(_peers(sizes, device))
    return out


def _peers(sizes: Sequence[int], device: str) -> dict[str, Callable[[], Any]]:
    """Third-party clippers that are installed, each followed by the bare fused step.

    ``zclip``: ``ZClip(max_grad_norm=1.0).step(model)`` (its z-score mode,
    capped at 1.0); ``smartclip``: ``smartclip.step(model, opt,
    ZScoreClip())``. Both read the norm on the host every step (``.item()``).
    """
    out: dict[str, Callable[[], Any]] = {}
    if importlib.util.find_spec("zclip") is not None:
        from zclip import ZClip

        z_params = _params(sizes, device, 0)
        z_model, z_opt = torch.nn.ParameterList(z_params), torch.optim.AdamW(
            z_params, lr=1e-4, fused=True)
        zclip = ZClip(max_grad_norm=1.0)

        def zclip_step() -> None:
            zclip.step(z_model)
            z_opt.step()

        out["zclip"] = zclip_step
    if importlib.util.find_spec("smartclip") is not None:
        import smartclip

        s_params = _params(sizes, device, 0)
        s_model, s_opt = torch.nn.ParameterList(s_params), torch.optim.AdamW(
            s_params, lr=1e-4, fused=True)
        clipper = smartclip.ZScoreClip()
        out["smartclip"] = lambda: smartclip.step(s_model, s_opt, clipper)
    return out


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
        "safeopt_steady_ms": medians["safeopt_steady"] * 1e3,
        "clip_grad_norm_ms": medians["clip_grad_norm_"] * 1e3,
        "safeopt_x": rel["safeopt"], "safeopt_steady_x": rel["safeopt_steady"],
        "clip_grad_norm_x": rel["clip_grad_norm_"],
        **{f"{peer}_ms": medians[peer] * 1e3 for peer in PEERS if peer in medians},
    }


def decompose(total: int = 10_000_000, n_tensors: int = 10, rounds: int = 60,
              warmup: int = 3) -> dict[str, float]:
    """Where the wrapped CPU step's time goes, as ratios to the bare step.

    Candidates, interleaved in one process, each on its own copy of the data:
    ``read+step`` (a plain ``sum`` over the gradients, the floor of any norm,
    then the bare step), ``norm+step`` (safeopt's norm kernel, then the bare
    step), and the wrapped step without and with clipping. What the wrapper
    adds beyond ``norm+step`` is the decision and its Python.
    """
    from safeopt_torch import _kernels

    sizes = split_sizes(total, n_tensors)

    def bare_opt(grad_std: float = 10.0) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        params = _params(sizes, "cpu", 0, grad_std)
        return torch.optim.AdamW(params, lr=1e-4, fused=True), params

    bare, _ = bare_opt()
    read, read_params = bare_opt()
    norm, norm_params = bare_opt()
    steady = safeopt.wrap(bare_opt(0.1 / total ** 0.5)[0], POLICY)
    clipping = safeopt.wrap(bare_opt()[0], POLICY)

    def read_step() -> None:
        for p in read_params:
            p.grad.sum()  # type: ignore[union-attr]
        read.step()

    def norm_step() -> None:
        _kernels._cpu_norms([p.grad for p in norm_params])  # type: ignore[misc]
        norm.step()

    medians = interleaved({"bare": bare.step, "read+step": read_step, "norm+step": norm_step,
                           "safeopt, no clip": steady.step, "safeopt, clipping": clipping.step},
                          warmup=warmup, rounds=rounds)
    return ratios(medians, "bare")


def rows(total: int = 10_000_000, tensor_counts: Sequence[int] = (10, 200, 1000),
         device: str = "cpu", rounds: int = 30) -> list[dict[str, Any]]:
    """Rows of :func:`measure` for each tensor count (what ``safeopt bench`` calls)."""
    return [measure(total, n, device, rounds) for n in tensor_counts]


def markdown(table: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    head = ("| device | params | tensors | bare ms | safeopt ms (clipping) "
            "| safeopt ms (no clip needed) | clip_grad_norm_+step ms | safeopt / bare "
            "| safeopt no-clip / bare | clip_grad_norm_ / bare |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in table:
        lines.append(
            f"| {r['device']} | {r['params']:,} | {r['tensors']} | {r['bare_ms']:.2f} "
            f"| {r['safeopt_ms']:.2f} | {r['safeopt_steady_ms']:.2f} "
            f"| {r['clip_grad_norm_ms']:.2f} | {r['safeopt_x']:.3f}x "
            f"| {r['safeopt_steady_x']:.3f}x | {r['clip_grad_norm_x']:.3f}x |")
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
    parser.add_argument("--decompose", action="store_true",
                        help="CPU: where the wrapped step's time goes (read floor, norm, "
                             "decision), at the first --tensors count")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decompose:
        parts = decompose(args.params, args.tensors[0], rounds=2 * args.rounds)
        print(" ".join(f"{name}={ratio:.3f}x" for name, ratio in parts.items()))
        return
    print(markdown(rows(args.params, args.tensors, args.device, args.rounds)))


if __name__ == "__main__":
    main()
