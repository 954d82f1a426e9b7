"""``safeopt demo --framework torch``: the demo's tasks trained in PyTorch.

Two cases of exploding gradients from the literature, each trained with plain
SGD on the sum over the batch of the squared errors, with the same
hyper-parameters whether bare or wrapped; data, initial weights and
hyper-parameters come from :mod:`safeopt_bench.data` (the same numbers in
every framework; see there why the bare runs must overflow):

* ``mlp``: a 12-layer tanh MLP with large initial weights (std ``1.5 /
  sqrt(fan_in)``) regressing targets of scale 10 (SGD, lr 0.3): the first
  bare update is thousands of times a clipped one, and the read-out then
  diverges by a factor of about 2500 per step.
* ``rnn``: a vanilla tanh RNN (50 units, recurrent weights ``1.5 * I``,
  spectral radius 1.5) on the addition problem of Pascanu et al. (2013) at
  sequence length 100 (SGD, lr 0.1): its last state is the same for every
  sequence, and the read-out diverges by a factor of about 200 per step.

"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import safeopt
from safeopt_bench import data
from safeopt_bench.demo import OnStep, Outcome
from safeopt_bench.tasks_torch import VanillaRNN

TASKS: dict[str, str] = {
    "mlp": "deep tanh MLP (12 layers x 64, init std 1.5/sqrt(fan_in)), regression, "
           "sum of squared errors, SGD lr 0.3, batch 64",
    "rnn": "vanilla tanh RNN (50 units, recurrent weights 1.5*I), addition problem T=100, "
           "sum of squared errors, SGD lr 0.1, batch 20",
}
STEPS: dict[str, int] = {"mlp": 300, "rnn": 300}
POLICY = "default"


# ---------------------------------------------------------------------------
# The demo's models, from the NumPy weights of safeopt_bench.data.
# ---------------------------------------------------------------------------
def mlp_model(seed: int) -> nn.Sequential:
    """The deep tanh MLP, with the initial weights of :func:`safeopt_bench.data.mlp_weights`."""
    layers = data.mlp_weights(data.init_rng(seed))
    modules: list[nn.Module] = []
    for i, (kernel, bias) in enumerate(layers):
        linear = nn.Linear(*kernel.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(bias))
        modules += [linear] if i == len(layers) - 1 else [linear, nn.Tanh()]
    return nn.Sequential(*modules)


def rnn_model(seed: int) -> VanillaRNN:
    """The vanilla RNN with the initial weights of :func:`safeopt_bench.data.rnn_weights`.

    ``nn.RNN`` has two biases, ``bias_ih`` and ``bias_hh``; ``bias_hh`` is
    kept at zero and frozen, so that the model (and its SGD steps) is the one
    bias of the JAX and Keras versions.
    """
    w = data.rnn_weights(data.init_rng(seed))
    model = VanillaRNN(2, 1, hidden=data.RNN_HIDDEN, rho=data.RNN_RHO)
    rnn: Any = model.rnn
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.from_numpy(w["w_ih"].T.copy()))
        rnn.weight_hh_l0.copy_(torch.from_numpy(w["w_hh"].T.copy()))
        rnn.bias_ih_l0.copy_(torch.from_numpy(w["b_h"]))
        rnn.bias_hh_l0.zero_()
        model.out.weight.copy_(torch.from_numpy(w["w_out"].T.copy()))
        model.out.bias.copy_(torch.from_numpy(w["b_out"]))
    rnn.bias_hh_l0.requires_grad_(False)
    return model


def _task(task: str, seed: int) -> tuple[nn.Module, Iterator[tuple[np.ndarray, np.ndarray]]]:
    if task == "mlp":
        return mlp_model(seed), data.regression_batches(seed)
    if task == "rnn":
        return rnn_model(seed), data.addition_batches(seed)
    raise ValueError(f"`task` must be one of {list(TASKS)}. Received: task={task!r}")


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
def train(task: str, protected: bool, steps: int | None, seed: int,
          on_step: OnStep) -> Outcome:
    """Trains ``task`` once (see :meth:`safeopt_bench.demo.FrameworkDemo.train`)."""
    threads = torch.get_num_threads()
    # The models are tiny: one thread is fastest and does not fight other work.
    torch.set_num_threads(1)
    try:
        return _train(task, protected, STEPS[task] if steps is None else steps, seed, on_step)
    finally:
        torch.set_num_threads(threads)


def _train(task: str, protected: bool, total: int, seed: int, on_step: OnStep) -> Outcome:
    model, batches = _task(task, seed)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in named]
    params = [p for _, p in named]
    opt: Any = torch.optim.SGD(named, lr=data.learning_rate(task))
    if protected:
        opt = safeopt.wrap(opt, POLICY)
    for step in range(total):
        x, y = (torch.from_numpy(a) for a in next(batches))
        # The objective is the sum over the batch of the squared errors; the
        # loss reported (and given to safeopt) is its mean, the batch's MSE.
        sse = ((model(x) - y) ** 2).sum()
        opt.zero_grad()
        sse.backward()
        loss = sse.detach() / x.shape[0]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        tensor_norms = [float(n) for n in torch._foreach_norm(grads)]
        if protected:
            opt.step(loss=loss)
        else:
            opt.step()
        measured = {"step": step, "total": total, "loss": float(loss),
                    "grad_norm": math.sqrt(sum(n * n for n in tensor_norms)),
                    "tensor_norms": tensor_norms, "weight_norm": _norm(params),
                    "names": names, "wrapped": opt if protected else None}
        if on_step(measured):
            break
    loss_value, accuracy = _evaluate(task, seed, model)
    stats = safeopt.stats(opt) if protected else None
    diagnosis = _diagnose(opt) if protected else None
    return Outcome(loss_value, accuracy, total, names, stats, diagnosis)


def _evaluate(task: str, seed: int, model: nn.Module) -> tuple[float, float | None]:
    x, y = data.eval_data(task, seed)
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        loss = float(np.mean((out.astype(np.float64) - y) ** 2))
    return loss, data.addition_accuracy(out, y) if task == "rnn" else None


def _norm(params: Sequence[Tensor]) -> float:
    norms = torch._foreach_norm([p.detach() for p in params])
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _diagnose(opt: Any) -> Any:
    return safeopt.diagnose(opt)
