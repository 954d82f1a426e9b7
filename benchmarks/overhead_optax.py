"""Overhead of the safeopt Optax wrapper against bare ``optax.adamw`` and the natives.

Every candidate is one jitted training update (``tx.update`` followed by
``optax.apply_updates``) with the parameters and the optimizer state donated,
over about 10M float32 parameters split into a few or many tensors. They are
timed interleaved in one process (:func:`safeopt_bench._timing.interleaved`)
and reported as ratios to the bare ``adamw`` step.

What was found (optimized HLO, ``--hlo DIR``): on CPU a fresh full-size
buffer costs about as much as a whole donated Adam step (writing new pages),
so the natives lose by *materialising* arrays, not by arithmetic:
``clip_by_global_norm`` writes a clipped copy of every gradient (its
``t / norm * c`` is not duplicated into Adam's three loops), and
``apply_if_finite`` adds its own selects on top. A naive safe wrapper loses
the same way: selecting the inner state with ``where(skip, old, new)`` made
XLA recompute Adam's new moments from the *old* ones inside the parameter
update, after the in-place (donated) state output had overwritten them, so
it copied every moment first (5-6x); and a ``lax.cond`` for the periodic
weight norm made it copy every parameter. The adapter now selects each new
state value inside the traced inner update as soon as it is defined (the
updates read the selected state, as the bare step reads the new one), and
orders the weight-norm ``cond`` before the parameter write; the remaining
cost is one read of the gradients for the norm.

Run:
  python -m safeopt_bench.overhead_optax            # Markdown table
  python -m safeopt_bench.overhead_optax --hlo DIR  # also dump each step's optimized HLO
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import safeopt
from safeopt_bench._timing import interleaved, ratios, split_sizes

POLICY = {"clip_norm": 1.0, "skip_nonfinite": True}
LAYOUTS = ((10, "few tensors"), (200, "many tensors"))


def candidates() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The transformations compared, by name (``bare`` is the baseline)."""
    def adamw() -> optax.GradientTransformation:
        return optax.adamw(1e-3)

    return {
        "bare": adamw,
        "safeopt": lambda: safeopt.wrap(adamw(), POLICY),
        "safeopt_wnorm_every_step": lambda: safeopt.wrap(adamw(), {**POLICY, "monitor_every": 1}),
        "chain_clip": lambda: optax.chain(optax.clip_by_global_norm(1.0), adamw()),
        "apply_if_finite": lambda: optax.apply_if_finite(
            optax.chain(optax.clip_by_global_norm(1.0), adamw()), 10),
    }


def _model(total: int, n_tensors: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    keys = jax.random.split(jax.random.key(0), n_tensors)
    sizes = split_sizes(total, n_tensors)
    params = {f"w{i:04d}": jax.random.normal(k, (n,), jnp.float32) * 0.02
              for i, (k, n) in enumerate(zip(keys, sizes))}
    grads = {name: jnp.full_like(p, 1e-3) + p for name, p in params.items()}
    return params, grads


def _stepper(tx: optax.GradientTransformation, params: Any, grads: Any,
             ) -> tuple[Callable[[], Any], Any]:
    """A zero-argument callable running one donated, jitted update in place."""
    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    box = [jax.tree.map(jnp.copy, params), None]
    box[1] = tx.init(box[0])

    def run() -> Any:
        box[0], box[1] = jitted(box[0], box[1], grads)
        return box[0]

    return run, jitted.lower(box[0], box[1], grads)


def fusion_count(lowered: Any) -> int:
    """Number of fusions in the optimized HLO of a lowered step."""
    text = lowered.compile().as_text()
    return sum(1 for line in text.splitlines()
               if line.lstrip().startswith(("fusion", "%fusion")) or " fusion(" in line)


def run(total: int = 10_000_000, layouts: tuple[tuple[int, str], ...] = LAYOUTS,
        rounds: int = 20, warmup: int = 3, hlo_dir: str | None = None) -> list[dict[str, Any]]:
    """Measures every candidate at each layout; returns one row per (layout, candidate).

    Rows carry ``framework``, ``tensors``, ``params``, ``candidate``, ``median_ms``,
    ``ratio`` (to the bare step) and ``fusions`` (in the optimized HLO).
    """
    rows: list[dict[str, Any]] = []
    for n_tensors, label in layouts:
        params, grads = _model(total, n_tensors)
        steps: dict[str, Callable[[], Any]] = {}
        fusions: dict[str, int] = {}
        for name, make in candidates().items():
            steps[name], lowered = _stepper(make(), params, grads)
            fusions[name] = fusion_count(lowered)
            if hlo_dir is not None:
                out = Path(hlo_dir) / f"{name}_{n_tensors}.hlo.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(lowered.compile().as_text())
        medians = interleaved(steps, warmup=warmup, rounds=rounds, sync=jax.block_until_ready)
        for name, ratio in ratios(medians, "bare").items():
            rows.append({"framework": "optax", "layout": label, "tensors": n_tensors,
                         "params": total, "candidate": name, "median_ms": medians[name] * 1e3,
                         "ratio": ratio, "fusions": fusions[name]})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """Renders rows as a Markdown table."""
    lines = ["| tensors | candidate | median ms | x bare | fusions |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tensors']} | {r['candidate']} | {r['median_ms']:.2f} | "
                     f"{r['ratio']:.2f} | {r['fusions']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Prints the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--hlo", default=None, help="directory for the optimized HLO dumps")
    args = parser.parse_args(argv)
    rows = run(args.params, rounds=args.rounds, hlo_dir=args.hlo)
    print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].device_kind}, "
          f"{args.params} params, policy {POLICY}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
