"""What ``recover=True`` costs the Optax wrapper: time per update and snapshot memory.

Each candidate is one jitted, donated update of ``optax.adamw`` (the stepper
of :mod:`safeopt_bench.overhead_optax`), timed interleaved in one process:

- ``bare``: ``optax.adamw``;
- ``safeopt``: wrapped with ``{"clip_norm": 1.0}``;
- ``recover``: the same with ``recover=True`` (a snapshot every
  ``snapshot_every`` = 100 updates: the cost of an ordinary update, which
  carries the snapshot and the ``lax.cond`` that takes it);
- ``snapshot every step``: ``snapshot_every=1``, what one snapshot costs.

The snapshot lives in the optimizer state, on the device and sharded like the
parameters: one copy of the parameters and of the inner state (AdamW: three
times the parameters).

Run: ``python -m safeopt_bench.recovery_cost_optax`` (``--params``,
``--tensors``, ``--rounds``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

import safeopt
from safeopt_bench import overhead_optax
from safeopt_bench._timing import interleaved, ratios, size_parser

RECOVER = {**overhead_optax.POLICY, "recover": True}


def candidates() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The transformations compared, by name (``bare`` is the baseline)."""
    def adamw() -> optax.GradientTransformation:
        return optax.adamw(1e-3)

    return {"bare": adamw,
            "safeopt": lambda: safeopt.wrap(adamw(), overhead_optax.POLICY),
            "recover": lambda: safeopt.wrap(adamw(), RECOVER),
            "snapshot every step": lambda: safeopt.wrap(adamw(), {**RECOVER,
                                                                   "snapshot_every": 1})}


def snapshot_bytes(tx: optax.GradientTransformation, params: Any) -> int:
    """Bytes of the optimizer state ``tx`` adds for its snapshot over the unwrapped state."""
    def size(tree: Any) -> int:
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
    return size(jax.eval_shape(tx.init, params)) - size(
        jax.eval_shape(safeopt.wrap(optax.adamw(1e-3), overhead_optax.POLICY).init, params))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Prints each candidate's median update time over ``bare``; returns the ratios."""
    args = size_parser(__doc__.splitlines()[0]).parse_args(argv)
    total = int(args.params)
    params, grads = overhead_optax._model(total, args.tensors)
    made = {name: make() for name, make in candidates().items()}
    steps = {name: overhead_optax._stepper(tx, params, grads)[0] for name, tx in made.items()}
    medians = interleaved(steps, rounds=args.rounds, sync=jax.block_until_ready)
    out = ratios(medians, "bare")
    print(f"jax {jax.__version__}, optax.adamw, {total / 1e6:g}M parameters in "
          f"{args.tensors} tensors, {args.rounds} interleaved rounds (median update / bare):")
    for name, ratio in out.items():
        print(f"  {name:<22} {medians[name] * 1e3:8.2f} ms  {ratio:6.3f}x")
    extra = snapshot_bytes(made["recover"], params)
    print(f"snapshot memory (device, in the state): {extra / 2 ** 20:.1f} MiB "
          f"(parameters {total * 4 / 2 ** 20:.1f} MiB)")
    return out


if __name__ == "__main__":
    main()
