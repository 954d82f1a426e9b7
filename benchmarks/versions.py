"""Overhead of this version against an earlier one, measured interleaved in one process.

``python -m safeopt_bench.versions --base REV`` extracts safeopt and its torch
and Optax adapters as they were at git revision ``REV`` into a temporary
directory under other package names (``safeopt_base``...), so that both
versions import side by side, and times, round-robin
(:func:`safeopt_bench._timing.interleaved`), the bare optimizer step, the
step wrapped by ``REV``'s safeopt and the step wrapped by this one, with
gradients that clip and gradients that do not. It is how a change to the
hot path quotes its before/after ratios on a noisy machine. Run it from a
git checkout.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safeopt_bench._timing import interleaved, ratios, split_sizes

_PACKAGES = {"safeopt": "src/safeopt", "safeopt_torch": "adapters/safeopt_torch",
             "safeopt_optax": "adapters/safeopt_optax"}
POLICY = {"clip_norm": 1.0}


def extract(rev: str, dest: Path, suffix: str = "_base") -> None:
    """Writes the packages of ``rev`` under ``dest`` as ``<name><suffix>``, imports renamed."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                               text=True, check=True).stdout.strip())
    names = "|".join(sorted(_PACKAGES, key=len, reverse=True))
    pattern = re.compile(rf"\b({names})\b")
    for name, folder in _PACKAGES.items():
        files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, folder],
                               cwd=root, capture_output=True, text=True, check=True).stdout
        for path in files.split():
            if not path.endswith(".py"):
                continue
            text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root,
                                  capture_output=True, text=True, check=True).stdout
            target = dest / (name + suffix) / Path(path).relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(pattern.sub(lambda m: m.group(1) + suffix, text))


def _torch_candidates(base: Any, total: int, n_tensors: int) -> dict[str, Callable[[], Any]]:
    import torch

    import safeopt
    from safeopt_bench.overhead_torch import _params

    sizes = split_sizes(total, n_tensors)
    steady_std = 0.1 / total ** 0.5

    def adamw(grad_std: float = 10.0) -> torch.optim.Optimizer:
        return torch.optim.AdamW(_params(sizes, "cpu", 0, grad_std), lr=1e-4, fused=True)

    old_wrap = base.SafeOptimizer
    old_policy = base.policy_cls(**POLICY)
    out: dict[str, Callable[[], Any]] = {"bare": adamw().step}
    for label, std in (("clipping", 10.0), ("no clip", steady_std)):
        out[f"base, {label}"] = old_wrap(adamw(std), old_policy).step
        out[f"this, {label}"] = safeopt.wrap(adamw(std), POLICY).step
    return out


class _Base:
    """The base version's torch wrapper class and policy class."""

    def __init__(self, suffix: str) -> None:
        self.SafeOptimizer = importlib.import_module(
            f"safeopt_torch{suffix}._optimizer").SafeOptimizer
        self.policy_cls = importlib.import_module(f"safeopt{suffix}").Policy


def _optax_candidates(suffix: str, total: int, n_tensors: int) -> dict[str, Callable[[], Any]]:
    import jax.numpy as jnp
    import optax

    import safeopt

    old = importlib.import_module(f"safeopt_optax{suffix}")
    sizes = split_sizes(total, n_tensors)
    params = [jnp.ones(s) for s in sizes]
    grads = [jnp.full(s, 10.0) for s in sizes]
    out: dict[str, Callable[[], Any]] = {}
    for name, tx in (("bare", optax.adamw(1e-4)),
                     ("base, clipping", old.safe_transform(optax.adamw(1e-4), POLICY)),
                     ("this, clipping", safeopt.wrap(optax.adamw(1e-4), POLICY))):
        out[name] = _optax_step(tx, params, grads)
    return out


def _optax_step(tx: Any, params: Any, grads: Any) -> Callable[[], Any]:
    """One jitted update-and-apply of ``tx``, the state and parameters donated."""
    import jax
    import optax

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params: Any, state: Any, grads: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    box = [[p.copy() for p in params], tx.init(params)]

    def step() -> Any:
        box[0], box[1] = update(box[0], box[1], grads)
        return box[0]

    return step


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the ratios to the bare step, for each tensor count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--framework", choices=("torch", "optax"), default="torch")
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--tensors", type=int, nargs="+", default=[10, 200, 1000])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        extract(args.base, Path(tmp))
        sys.path.insert(0, tmp)
        for n in args.tensors:
            if args.framework == "torch":
                import torch

                torch.manual_seed(0)
                candidates = _torch_candidates(_Base("_base"), args.params, n)
                sync = None
            else:
                from jax import block_until_ready

                candidates = _optax_candidates("_base", args.params, n)
                sync = block_until_ready
            medians = interleaved(candidates, rounds=args.rounds, sync=sync)
            cells = ", ".join(f"{k} {v:.3f}x" for k, v in ratios(medians, "bare").items()
                              if k != "bare")
            print(f"{args.framework} {args.params:,} params in {n} tensors "
                  f"(bare {medians['bare'] * 1e3:.2f} ms): {cells}", flush=True)


if __name__ == "__main__":
    main()
