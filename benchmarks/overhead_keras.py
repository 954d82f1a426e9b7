"""Overhead of the Keras wrapper in ``model.fit`` (TensorFlow backend).

Three candidates train the same MLP (a few million parameters) on the same
in-memory data with ``model.fit``, measured interleaved in one process
(:func:`safeopt_bench._timing.interleaved`), one ``fit`` call of
``steps_per_epoch`` steps per sample:

- ``global_clipnorm``: ``Adam(global_clipnorm=1.0)``, Keras's own clipping
  (the baseline);
- ``safeopt``: ``safeopt.wrap(Adam(), {"clip_norm": 1.0, "skip_nonfinite":
  True})`` (the default monitor included);
- ``bare``: ``Adam()`` without clipping, for reference.

Target (issue 5): ``safeopt`` at most 1.1x ``global_clipnorm``.
Run: ``python -m safeopt_bench.overhead_keras`` (sets ``KERAS_BACKEND``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

POLICY = {"clip_norm": 1.0, "skip_nonfinite": True}


def _keras() -> Any:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "The Keras overhead benchmark runs on the TensorFlow backend: set "
            f"KERAS_BACKEND=tensorflow. Received: backend={keras.backend.backend()!r}"
        )
    return keras


def _model(keras: Any, width: int, depth: int, n_in: int) -> Any:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((n_in,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers)


def _candidates(width: int, depth: int, batch: int, steps: int, steps_per_execution: int,
                ) -> tuple[dict[str, Callable[[], Any]], int]:
    import numpy as np

    import safeopt

    keras = _keras()
    n_in = 256
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, n_in)).astype(np.float32)
    y = rng.integers(0, 10, size=(batch * steps,))
    optimizers = {
        "global_clipnorm": keras.optimizers.Adam(1e-4, global_clipnorm=1.0),
        "safeopt": safeopt.wrap(keras.optimizers.Adam(1e-4), POLICY),
        "bare": keras.optimizers.Adam(1e-4),
    }
    candidates: dict[str, Callable[[], Any]] = {}
    n_params = 0
    for name, opt in optimizers.items():
        model = _model(keras, width, depth, n_in)
        model.compile(optimizer=opt, steps_per_execution=steps_per_execution,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        n_params = model.count_params()
        candidates[name] = _fit_call(model, x, y, batch)
    return candidates, n_params


def _fit_call(model: Any, x: Any, y: Any, batch: int) -> Callable[[], Any]:
    def run() -> Any:
        return model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)

    return run


def run(width: int = 1024, depth: int = 3, batch: int = 64, steps: int = 40,
        steps_per_execution: int = 10, rounds: int = 7, warmup: int = 2) -> list[dict[str, Any]]:
    """Measures the candidates; returns one row per candidate.

    Args:
      width: Hidden width of the MLP.
      depth: Number of hidden layers.
      batch: Batch size.
      steps: Steps per ``fit`` call (one epoch).
      steps_per_execution: Keras's ``steps_per_execution``.
      rounds: Timed interleaved rounds.
      warmup: Untimed calls per candidate first (tracing).

    Returns:
      Rows with ``candidate``, ``params``, ``ms_per_step`` and
      ``vs_global_clipnorm``.
    """
    from safeopt_bench._timing import interleaved, ratios

    candidates, n_params = _candidates(width, depth, batch, steps, steps_per_execution)
    medians = interleaved(candidates, warmup=warmup, rounds=rounds, inner=steps)
    rel = ratios(medians, "global_clipnorm")
    return [
        {"framework": "keras-tensorflow", "candidate": name, "params": n_params,
         "batch": batch, "steps_per_execution": steps_per_execution,
         "ms_per_step": medians[name] * 1e3, "vs_global_clipnorm": rel[name]}
        for name in candidates
    ]


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Renders ``rows`` as a Markdown table."""
    lines = ["| candidate | params | ms / step | vs global_clipnorm |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['params']:,} | {r['ms_per_step']:.2f} | "
                     f"{r['vs_global_clipnorm']:.3f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: prints the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--steps-per-execution", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    rows = run(args.width, args.depth, args.batch, args.steps, args.steps_per_execution,
               args.rounds)
    print(markdown(rows))


if __name__ == "__main__":
    main()
