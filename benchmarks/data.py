"""Data, initial weights and hyper-parameters of the demo's tasks, in NumPy.

Every framework (``safeopt_torch.demo``, ``safeopt_optax.demo``,
``safeopt_keras.demo`` on each Keras backend) takes its data and initial
weights from here, so all of them start from the same float32 numbers and see
the same batches. Kernels are in the ``(in, out)`` layout of JAX and Keras
(torch transposes them).

The two tasks:

* ``mlp``: a 12-layer tanh MLP (64 units, weights ``N(0, (1.5 / sqrt(fan_in))^2)``,
  zero biases) regressing targets of scale 10; batch 64; plain SGD, lr
  :data:`MLP_LR`.
* ``rnn``: a vanilla tanh RNN, 50 units, recurrent matrix ``1.5 * I``
  (spectral radius 1.5), on the addition problem of Pascanu et al. (2013) at
  length 100; batch 20; plain SGD, lr :data:`RNN_LR`.

Both minimise the **sum over the batch** of the squared errors,
``S = sum_i (p_i - y_i)^2`` (what the demos report as the training loss is
``S / batch``, the batch's mean squared error, comparable with the final loss
measured on fresh data).

Why the bare runs go to Inf/NaN whatever the framework or the processor
-----------------------------------------------------------------------
Both models end in a linear read-out ``p = w . h + b`` of tanh features
``h`` in ``[-1, 1]^n``. The Hessian of ``S`` in the read-out's parameters
``(w, b)`` is ``2 sum_i [h_i; 1][h_i; 1]^T``. Its top eigenvalue is at least
its ``(b, b)`` entry, ``2 B``, and at least ``2 B (1 + |h_mean|^2)`` (Rayleigh
quotient on ``[h_mean; 1]``, ``h_mean`` the batch mean of the features); it is
at most its trace, ``2 B (n + 1)``. Plain SGD on a quadratic diverges, by the
factor ``|1 - lr * lambda|`` per step, as soon as ``lr * lambda > 2``:

1. *Unstable from step 0, by construction.* The bias term alone gives
   ``lr * lambda >= 2 lr B`` = 38.4 for the MLP (19 times the limit 2), and 4
   for the RNN, whatever the weights. The RNN's last hidden state is, moreover,
   nearly the same vector for every sequence: with ``W_hh = 1.5 I`` every unit
   is the bistable neuron of Pascanu et al. (2013, fig. 6), whose stable
   states are ``+-0.86``; the inputs of the addition problem are non-negative,
   so each unit settles on the side of its input weight's sign and stays
   there; ``|h_mean|^2`` is about 30 (of at most ``0.74 * 50``), so
   ``lr * lambda`` is above 100 at the first step (seeds 0-2: 120-134).
2. *Collapse.* The first bare update is thousands (MLP: ``lr |grad S|`` =
   1100-1400, against initial weights of norm 41) or hundreds (RNN: 17-35,
   norm 11) of times the size of a clipped update; it saturates the hidden
   units, whose outputs become frozen +-1 patterns shared, or nearly, by the
   whole batch.
3. *Rate.* From then on each step multiplies the residual by up to
   ``2 lr B (n + 1) - 1``: 2495 for the MLP (measured: about 1400), 203 for
   the RNN (reached exactly). Because the features are bounded by 1, no run
   can grow faster, so the overflow comes at a predictable step: the float32
   norm of the read-out's gradient, ``2 B |r| sqrt(n)``, passes 1.8e19 (the
   square root of float32's largest number) at ``|r|`` of about 1e16-1e17,
   some 5 steps into the MLP run and 8-10 into the RNN run. Nothing here rests
   on the rounding: every framework and backend, over 10 seeds, gives steps 4-7
   (MLP) and 8-10 (RNN), and a float64 run passes float32's range at steps 5-6
   and 6-9 (seeds 0-2).

The wrapped runs cannot overflow: safeopt's default policy clips the global
gradient norm to 1, so each update moves the parameters by at most ``lr``;
after ``t`` steps ``|p| <= sqrt(n + 1) (|(w_0, b_0)| + lr t)``, below 740
(MLP) and 220 (RNN) within 300 steps. (Every step is clipped: ``|grad S|`` is
far above 1.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

N_IN = 20
"""Inputs of the regression task."""

MLP_DEPTH, MLP_WIDTH, MLP_GAIN = 12, 64, 1.5
MLP_BATCH, MLP_LR = 64, 0.3
RNN_HIDDEN, RNN_RHO, RNN_LENGTH = 50, 1.5, 100
RNN_BATCH, RNN_LR = 20, 0.1
RNN_INPUT_STD, RNN_READOUT_STD = 0.1, 0.1

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

    The recurrent matrix is ``RNN_RHO * I`` (spectral radius 1.5): each unit
    is bistable, with stable states ``+-0.86`` (the solutions of ``h =
    tanh(1.5 h)``), so on the non-negative inputs of the addition problem the
    last hidden state is the same for every sequence (see the module's
    docstring). Input and read-out weights are ``N(0, 0.1^2)``, biases zero.
    """
    hidden = RNN_HIDDEN
    return {
        "w_ih": (RNN_INPUT_STD * rng.standard_normal((n_in, hidden))).astype(np.float32),
        "w_hh": (RNN_RHO * np.eye(hidden)).astype(np.float32),
        "b_h": np.zeros(hidden, np.float32),
        "w_out": (RNN_READOUT_STD * rng.standard_normal((hidden, 1))).astype(np.float32),
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


def learning_rate(task: str) -> float:
    """The SGD learning rate of ``task`` (the same bare and wrapped, in every framework)."""
    return {"mlp": MLP_LR, "rnn": RNN_LR}[task]
