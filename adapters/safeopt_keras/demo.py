"""The demo's tasks in Keras 3 (imported only by ``safeopt demo --framework keras``).

The two cases of exploding gradients of ``safeopt_torch.demo``, with the
same data, initial weights and hyper-parameters (all from
:mod:`safeopt_bench.data`, which says why the bare runs must overflow), as
Keras models on whichever backend ``KERAS_BACKEND`` selects (TensorFlow, JAX
or torch):

* ``mlp``: a 12-layer tanh MLP (``Dense`` layers) with large initial weights
  (std ``1.5 / sqrt(fan_in)``) regressing targets of scale 10
  (``keras.optimizers.SGD(0.3)``);
* ``rnn``: a ``SimpleRNN`` (50 tanh units, recurrent weights ``1.5 * I``) on
  the addition problem of Pascanu et al. (2013) at sequence length 100
  (``keras.optimizers.SGD(0.1)``).

Both minimise the sum over the batch of the squared errors; the loss
reported, and given to safeopt, is the batch's mean squared error. The
protected run is ``safeopt.wrap(keras.optimizers.SGD(...), "default")``.
The training loop is a small custom one per backend (``tf.function`` with a
``GradientTape``; ``jax.jit`` over ``stateless_call`` and
``stateless_apply``; eager torch autograd), because ``model.fit`` does not
expose the per-step gradient norms that the table and the bare run's
diagnosis need. The initial weights come from NumPy, so every backend starts
from the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

import safeopt
from safeopt_bench import data
from safeopt_bench.demo import OnStep, Outcome

TASKS: dict[str, str] = {
    "mlp": "deep tanh MLP (12 Dense x 64, init std 1.5/sqrt(fan_in)), regression, "
           "sum of squared errors, keras SGD lr 0.3, batch 64",
    "rnn": "SimpleRNN (50 tanh units, recurrent weights 1.5*I), addition problem T=100, "
           "sum of squared errors, keras SGD lr 0.1, batch 20",
}
STEPS: dict[str, int] = {"mlp": 300, "rnn": 300}
POLICY = "default"

Batch = tuple[np.ndarray, np.ndarray]
#: ``step(x, y) -> (loss, raw per-tensor gradient norms, weight norm after the update)``.
Step = Callable[[np.ndarray, np.ndarray], tuple[Any, Any, Any]]


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------
def deep_mlp(seed: int) -> keras.Model:
    """The deep tanh MLP (hidden layers ``dense00``..., read-out ``out``)."""
    layers = data.mlp_weights(data.init_rng(seed))
    model = keras.Sequential(
        [keras.Input((data.N_IN,))]
        + [keras.layers.Dense(data.MLP_WIDTH, activation="tanh", name=f"dense{i:02d}")
           for i in range(len(layers) - 1)]
        + [keras.layers.Dense(1, name="out")], name="mlp")
    model.set_weights([w for layer in layers for w in layer])
    return model


def vanilla_rnn(seed: int) -> keras.Model:
    """A ``SimpleRNN`` read out from its last state, recurrent weights ``1.5 * I``."""
    w = data.rnn_weights(data.init_rng(seed))
    model = keras.Sequential([
        keras.Input((data.RNN_LENGTH, 2)),
        keras.layers.SimpleRNN(data.RNN_HIDDEN, activation="tanh", name="rnn"),
        keras.layers.Dense(1, name="out"),
    ], name="rnn")
    model.set_weights([w["w_ih"], w["w_hh"], w["b_h"], w["w_out"], w["b_out"]])
    return model


def _task(task: str, seed: int) -> tuple[keras.Model, Iterator[Batch], Any]:
    if task == "mlp":
        return (deep_mlp(seed), data.regression_batches(seed),
                keras.optimizers.SGD(learning_rate=data.MLP_LR))
    if task == "rnn":
        return (vanilla_rnn(seed), data.addition_batches(seed),
                keras.optimizers.SGD(learning_rate=data.RNN_LR))
    raise ValueError(f"`task` must be one of {list(TASKS)}. Received: task={task!r}")


# ---------------------------------------------------------------------------
# One training step per backend.
# ---------------------------------------------------------------------------
def _sse(out: Any, y: Any) -> Any:
    """The objective: the sum over the batch of the squared errors."""
    return ops.sum(ops.square(out - y))


def _norms(tensors: Sequence[Any]) -> Any:
    return ops.stack([ops.sqrt(ops.sum(ops.square(t))) for t in tensors])


def _global_norm(tensors: Sequence[Any]) -> Any:
    return ops.sqrt(ops.sum(ops.square(_norms(tensors))))


def make_step(model: keras.Model, opt: Any, protected: bool) -> Step:
    """The training step of the current Keras backend (builds ``opt`` first).

    The gradient is that of :func:`_sse`; the loss returned, and passed to
    safeopt by a protected step (``apply(..., loss=loss)``), is the batch's
    mean squared error.
    """
    opt.build(model.trainable_variables)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_step(model, opt, protected)
    if backend == "jax":
        return _jax_step(model, opt, protected)
    if backend == "torch":
        return _torch_step(model, opt, protected)
    raise RuntimeError(f"The Keras demo runs on the tensorflow, jax and torch backends. "
                       f"Received: KERAS_BACKEND={backend!r}")


def _tf_step(model: keras.Model, opt: Any, protected: bool) -> Step:
    import tensorflow as tf

    variables = list(model.trainable_variables)

    @tf.function
    def step(x: Any, y: Any) -> tuple[Any, Any, Any]:
        with tf.GradientTape() as tape:
            sse = _sse(model(x, training=True), y)
        grads = tape.gradient(sse, variables)
        loss = sse / ops.cast(ops.shape(x)[0], sse.dtype)
        if protected:
            opt.apply(grads, variables, loss=loss)
        else:
            opt.apply(grads, variables)
        return loss, _norms(grads), _global_norm(variables)

    return step


def _jax_step(model: keras.Model, opt: Any, protected: bool) -> Step:
    """``jax.jit`` of a stateless step; values go back into the variables every step.

    The model's variables are written back every step so that the weights
    are always current; the optimizer's too, so that ``safeopt.stats`` and
    the telemetry read the state of this step.
    """
    import jax

    def loss_fn(trainable: Any, non_trainable: Any, x: Any, y: Any) -> Any:
        out, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return _sse(out, y), non_trainable

    @jax.jit
    def pure(trainable: Any, non_trainable: Any, opt_values: Any, x: Any, y: Any) -> Any:
        (sse, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, x, y)
        loss = sse / x.shape[0]
        extra = {"loss": loss} if protected else {}
        trainable, opt_values = opt.stateless_apply(opt_values, grads, trainable, **extra)
        return trainable, non_trainable, opt_values, (loss, _norms(grads),
                                                      _global_norm(trainable))

    def step(x: Any, y: Any) -> tuple[Any, Any, Any]:
        state = [[v.value for v in group] for group in
                 (model.trainable_variables, model.non_trainable_variables, opt.variables)]
        *new, metrics = pure(*state, x, y)
        for group, values in zip(
                (model.trainable_variables, model.non_trainable_variables, opt.variables), new):
            for var, value in zip(group, values):
                var.assign(value)
        return metrics

    return step


def _torch_step(model: keras.Model, opt: Any, protected: bool) -> Step:
    import torch

    variables = list(model.trainable_variables)

    def step(x: Any, y: Any) -> tuple[Any, Any, Any]:
        sse = _sse(model(ops.convert_to_tensor(x), training=True), ops.convert_to_tensor(y))
        sse.backward()
        loss = sse.detach() / x.shape[0]
        grads = [v.value.grad for v in variables]
        with torch.no_grad():
            norms = _norms(grads)
            if protected:
                opt.apply(grads, variables, loss=loss)
            else:
                opt.apply(grads, variables)
            weight_norm = _global_norm([v.value for v in variables])
        for v in variables:
            v.value.grad = None
        return loss, norms, weight_norm

    return step


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
def train(task: str, protected: bool, steps: int | None, seed: int,
          on_step: OnStep) -> Outcome:
    """Trains ``task`` once (see :meth:`safeopt_bench.demo.FrameworkDemo.train`)."""
    with _one_torch_thread():
        return _train(task, protected, STEPS[task] if steps is None else steps, seed, on_step)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Runs with one intra-op thread on the torch backend (as the torch demo does).

    The models are tiny, and on a busy machine torch's busy-waiting threads
    made each step ten times slower (measured: 346 s instead of 26 s for the
    whole demo on 2 shared cores).
    """
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(task: str, protected: bool, total: int, seed: int, on_step: OnStep) -> Outcome:
    model, batches, opt = _task(task, seed)
    if protected:
        opt = safeopt.wrap(opt, POLICY)
    names = [v.path for v in model.trainable_variables]
    step_fn = make_step(model, opt, protected)
    for step in range(total):
        x, y = next(batches)
        loss, norms, weight_norm = (_host(t) for t in step_fn(x, y))
        measured = {"step": step, "total": total, "loss": float(loss),
                    "grad_norm": float(np.sqrt(np.sum(np.square(norms, dtype=np.float64)))),
                    "tensor_norms": [float(n) for n in norms],
                    "weight_norm": float(weight_norm), "names": names,
                    "wrapped": opt if protected else None}
        if on_step(measured):
            break
    final_loss, accuracy = _evaluate(task, seed, model)
    stats = safeopt.stats(opt) if protected else None
    diagnosis = safeopt.diagnose(opt) if protected else None
    return Outcome(final_loss, accuracy, total, names, stats, diagnosis)


def _host(tensor: Any) -> np.ndarray:
    """A NumPy copy; torch tensors through torch itself (``np.array(tensor)`` warns on NumPy 2)."""
    if hasattr(tensor, "detach"):
        return np.asarray(tensor.detach().cpu().numpy())
    return np.asarray(ops.convert_to_numpy(tensor))


def _evaluate(task: str, seed: int, model: keras.Model) -> tuple[float, float | None]:
    x, y = data.eval_data(task, seed)
    out = _host(model(ops.convert_to_tensor(x), training=False))
    with np.errstate(over="ignore", invalid="ignore"):
        loss = float(np.mean((out.astype(np.float64) - y) ** 2))
    return loss, data.addition_accuracy(out, y) if task == "rnn" else None
