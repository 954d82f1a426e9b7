"""The demo's tasks in JAX and Optax (imported only by ``safeopt demo --framework jax``).

The two cases of exploding gradients of ``safeopt_torch.demo``, with the
same data, initial weights and hyper-parameters (all from
:mod:`safeopt_bench.data`, which says why the bare runs must overflow),
written as pure functions over parameter dicts:

* ``mlp``: a 12-layer tanh MLP with large initial weights (std ``1.5 /
  sqrt(fan_in)``) regressing targets of scale 10 (``optax.sgd(0.3)``);
* ``rnn``: a vanilla tanh RNN (50 units, recurrent weights ``1.5 * I``,
  unrolled with ``jax.lax.scan``) on the addition problem of Pascanu et al.
  (2013) at sequence length 100 (``optax.sgd(0.1)``).

Both minimise the sum over the batch of the squared errors. The protected
run is ``safeopt.wrap(optax.sgd(...), "default")``, whose ``update`` takes
the loss (the batch's mean squared error) as ``value``; the whole step
(forward, backward, safeopt, SGD) is one ``jax.jit``-compiled function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import safeopt
from safeopt_bench import data
from safeopt_bench.demo import OnStep, Outcome

TASKS: dict[str, str] = {
    "mlp": "deep tanh MLP (12 layers x 64, init std 1.5/sqrt(fan_in)), regression, "
           "sum of squared errors, optax.sgd lr 0.3, batch 64",
    "rnn": "vanilla tanh RNN (50 units, recurrent weights 1.5*I, lax.scan), addition "
           "problem T=100, sum of squared errors, optax.sgd lr 0.1, batch 20",
}
STEPS: dict[str, int] = {"mlp": 300, "rnn": 300}
POLICY = "default"

Params = dict[str, dict[str, jax.Array]]
Apply = Callable[[Params, jax.Array], jax.Array]
Batch = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------
# Models: parameters are nested dicts (leaf names "['dense00']['kernel']"...).
# ---------------------------------------------------------------------------
def mlp_params(seed: int) -> Params:
    """The deep MLP's parameters: hidden layers ``dense00``... then ``out``."""
    layers = data.mlp_weights(data.init_rng(seed))
    params = {f"dense{i:02d}": {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}
              for i, (k, b) in enumerate(layers[:-1])}
    params["out"] = {"kernel": jnp.asarray(layers[-1][0]), "bias": jnp.asarray(layers[-1][1])}
    return params


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """``tanh`` hidden layers, linear read-out."""
    for name in sorted(k for k in params if k != "out"):
        x = jnp.tanh(x @ params[name]["kernel"] + params[name]["bias"])
    return x @ params["out"]["kernel"] + params["out"]["bias"]


def rnn_params(seed: int) -> Params:
    """The vanilla RNN's parameters: ``rnn`` (``w_ih``, ``w_hh = 1.5 I``, ``b_h``) and ``out``."""
    w = {k: jnp.asarray(v) for k, v in data.rnn_weights(data.init_rng(seed)).items()}
    return {"rnn": {"w_ih": w["w_ih"], "w_hh": w["w_hh"], "b_h": w["b_h"]},
            "out": {"kernel": w["w_out"], "bias": w["b_out"]}}


def rnn_apply(params: Params, x: jax.Array) -> jax.Array:
    """Runs ``h_t = tanh(x_t W_ih + h_{t-1} W_hh + b)`` over time; reads out ``h_T``."""
    cell = params["rnn"]
    inputs = jnp.swapaxes(x, 0, 1) @ cell["w_ih"] + cell["b_h"]  # (time, batch, hidden)

    def step(h: jax.Array, x_t: jax.Array) -> tuple[jax.Array, None]:
        return jnp.tanh(x_t + h @ cell["w_hh"]), None

    h0 = jnp.zeros((x.shape[0], cell["w_hh"].shape[0]), x.dtype)
    h, _ = jax.lax.scan(step, h0, inputs)
    return h @ params["out"]["kernel"] + params["out"]["bias"]


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
def _task(task: str, seed: int,
          ) -> tuple[Params, Apply, Iterator[Batch], optax.GradientTransformation]:
    if task == "mlp":
        return (mlp_params(seed), mlp_apply, data.regression_batches(seed),
                optax.sgd(data.MLP_LR))
    if task == "rnn":
        return (rnn_params(seed), rnn_apply, data.addition_batches(seed),
                optax.sgd(data.RNN_LR))
    raise ValueError(f"`task` must be one of {list(TASKS)}. Received: task={task!r}")


def make_step(apply: Apply, tx: Any, protected: bool) -> Callable[..., Any]:
    """The jitted training step ``(params, state, x, y) -> (params, state, metrics)``.

    The gradient is that of the sum over the batch of the squared errors;
    ``metrics`` is ``(loss, raw per-tensor gradient norms, weight norm after
    the update)``, ``loss`` being the batch's mean squared error, read by the
    host once per step for the progress bar and the table. A protected step
    passes that loss to safeopt as ``value``.
    """

    def sse_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.sum((apply(params, x) - y) ** 2)

    def step(params: Params, state: Any, x: jax.Array, y: jax.Array) -> Any:
        sse, grads = jax.value_and_grad(sse_fn)(params, x, y)
        loss = sse / x.shape[0]
        norms = jnp.stack([jnp.linalg.norm(g.ravel()) for g in jax.tree.leaves(grads)])
        extra = {"value": loss} if protected else {}
        updates, state = tx.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        return params, state, (loss, norms, optax.tree.norm(params))

    return jax.jit(step)


def leaf_names(params: Params) -> list[str]:
    """``jax.tree_util.keystr`` of each leaf path (the names the Optax adapter reports)."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(
        params)[0]]


def train(task: str, protected: bool, steps: int | None, seed: int,
          on_step: OnStep) -> Outcome:
    """Trains ``task`` once (see :meth:`safeopt_bench.demo.FrameworkDemo.train`)."""
    total = STEPS[task] if steps is None else steps
    params, apply, batches, tx = _task(task, seed)
    if protected:
        tx = safeopt.wrap(tx, POLICY)
    state = tx.init(params)
    names = leaf_names(params)
    step_fn = make_step(apply, tx, protected)
    for step in range(total):
        x, y = next(batches)
        params, state, metrics = step_fn(params, state, x, y)
        loss, norms, weight_norm = jax.device_get(metrics)
        measured = {"step": step, "total": total, "loss": float(loss),
                    "grad_norm": float(np.sqrt(np.sum(np.square(norms, dtype=np.float64)))),
                    "tensor_norms": [float(n) for n in norms],
                    "weight_norm": float(weight_norm), "names": names,
                    "wrapped": state if protected else None}
        if on_step(measured):
            break
    final_loss, accuracy = _evaluate(task, seed, apply, params)
    stats = safeopt.stats(state) if protected else None
    diagnosis = safeopt.diagnose(state) if protected else None
    return Outcome(final_loss, accuracy, total, names, stats, diagnosis)


def _evaluate(task: str, seed: int, apply: Apply, params: Params) -> tuple[float, float | None]:
    x, y = data.eval_data(task, seed)
    out = np.asarray(jax.jit(apply)(params, x))
    with np.errstate(over="ignore", invalid="ignore"):
        loss = float(np.mean((out.astype(np.float64) - y) ** 2))
    return loss, data.addition_accuracy(out, y) if task == "rnn" else None
