"""Data and initial weights of the demo's tasks, in NumPy (shared by the JAX and Keras demos).

Both tasks are the ones of ``safeopt_torch.demo`` (see there for the
references): a deep tanh MLP with large initial weights regressing targets of
scale 10, and a vanilla tanh RNN with recurrent weights of spectral radius
1.5 on the addition problem. Kernels are in the ``(in, out)`` layout of JAX
and Keras. Everything is drawn from one ``numpy.random.Generator``, so the
bare and the wrapped run of a task see the same data and start from the same
weights, and the Keras backends all start from the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

N_IN = 20
"""Inputs of the regression task."""

MLP_DEPTH, MLP_WIDTH, MLP_GAIN = 12, 64, 1.5
RNN_HIDDEN, RNN_RHO, RNN_LENGTH = 50, 1.5, 100
MLP_BATCH, RNN_BATCH = 64, 20

Arrays = tuple[np.ndarray, np.ndarray]


def regression_data(n: int, rng: np.random.Generator, scale: float = 10.0) -> Arrays:
    """``y = scale * tanh(2 x.w / sqrt(d)) + noise``: a smooth target of scale 10 (float32)."""
    x = rng.standard_normal((n, N_IN))
    w = np.random.default_rng(1234).standard_normal((N_IN, 1))
    y = np.tanh(2.0 * (x @ w) / math.sqrt(N_IN)) * scale
    y = y + 0.1 * scale * rng.standard_normal((n, 1))
    return x.astype(np.float32), y.astype(np.float32)


def addition_data(n: int, length: int, rng: np.random.Generator) -> Arrays:
    """The addition problem (Hochreiter & Schmidhuber, 1997; Pascanu et al., 2013).

    Each step carries a value in [0, 1] and a marker; two steps are marked,
    one in the first 10% of the sequence and one before the middle; the
    target is the sum of the two marked values.

    Returns:
      ``x`` of shape ``(n, length, 2)`` and ``y`` of shape ``(n, 1)``, float32.
    """
    values = rng.random((n, length))
    marks = np.zeros((n, length))
    rows = np.arange(n)
    tenth = max(length // 10, 1)
    marks[rows, rng.integers(0, tenth, n)] = 1.0
    marks[rows, rng.integers(tenth, length // 2, n)] = 1.0
    x = np.stack([values, marks], -1).astype(np.float32)
    return x, (values * marks).sum(1, keepdims=True).astype(np.float32)


def addition_accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Fraction of sequences with squared error at most 0.04 (Pascanu et al., 2013)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.mean((np.asarray(out) - np.asarray(y)) ** 2 <= 0.04))


def mlp_weights(rng: np.random.Generator) -> list[Arrays]:
    """``(kernel, bias)`` of each layer of the deep MLP: std ``gain / sqrt(fan_in)``, zero bias."""
    layers = []
    fan_in = N_IN
    for width in [MLP_WIDTH] * MLP_DEPTH + [1]:
        kernel = rng.standard_normal((fan_in, width)) * (MLP_GAIN / math.sqrt(fan_in))
        layers.append((kernel.astype(np.float32), np.zeros(width, np.float32)))
        fan_in = width
    return layers


def rnn_weights(rng: np.random.Generator, n_in: int = 2) -> dict[str, np.ndarray]:
    """Initial weights of the vanilla RNN: ``w_ih``, ``w_hh``, ``b_h``, ``w_out``, ``b_out``.

    The recurrent matrix is Gaussian rescaled to spectral radius
    :data:`RNN_RHO`; above 1, back-propagation through time can explode
    (Pascanu et al., 2013).
    """
    hidden = RNN_HIDDEN
    w_hh = rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)
    w_hh *= RNN_RHO / np.abs(np.linalg.eigvals(w_hh)).max()
    return {
        "w_ih": (0.1 * rng.standard_normal((n_in, hidden))).astype(np.float32),
        "w_hh": w_hh.astype(np.float32),
        "b_h": np.zeros(hidden, np.float32),
        "w_out": (0.1 * rng.standard_normal((hidden, 1))).astype(np.float32),
        "b_out": np.zeros(1, np.float32),
    }


def regression_batches(seed: int, n: int = 4096) -> Iterator[Arrays]:
    """Mini-batches of :data:`MLP_BATCH` drawn with replacement from ``n`` examples."""
    rng = np.random.default_rng(seed)
    x, y = regression_data(n, rng)
    while True:
        idx = rng.integers(0, n, MLP_BATCH)
        yield x[idx], y[idx]


def addition_batches(seed: int) -> Iterator[Arrays]:
    """Fresh addition-problem batches of :data:`RNN_BATCH` sequences of length 100."""
    rng = np.random.default_rng(seed)
    while True:
        yield addition_data(RNN_BATCH, RNN_LENGTH, rng)


def eval_data(task: str, seed: int) -> Arrays:
    """Fresh data (never trained on) to measure the final loss and accuracy."""
    rng = np.random.default_rng(seed + 10_000)
    if task == "mlp":
        return regression_data(2048, rng)
    return addition_data(1000, RNN_LENGTH, rng)


def init_rng(seed: int) -> np.random.Generator:
    """The generator of the initial weights (distinct from the data's)."""
    return np.random.default_rng([seed, 1])
