"""``safeopt demo --framework torch``: the demo's tasks trained in PyTorch.

Two cases of exploding gradients from the literature, each trained with plain
SGD and the same hyper-parameters whether bare or wrapped:

* ``mlp``: a 12-layer tanh MLP with large initial weights (std ``1.5 /
  sqrt(fan_in)``) regressing targets of scale 10 (SGD, lr 0.03, momentum 0.9):
  the gradient norm grows through the layers, the bare run's updates blow the
  weights up and the loss goes NaN.
* ``rnn``: a vanilla tanh RNN (50 units, recurrent weights of spectral radius
  1.5) on the addition problem of Pascanu et al. (2013) at sequence length 100
  (SGD, lr 0.1): back-propagation through 100 steps explodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import safeopt
from safeopt_bench.demo import OnStep, Outcome
from safeopt_bench.tasks_torch import (
    VanillaRNN,
    addition_data,
    deep_mlp,
    regression_data,
    sample,
    stream,
)

TASKS: dict[str, str] = {
    "mlp": "deep tanh MLP (12 layers x 64, init std 1.5/sqrt(fan_in)), regression, "
           "SGD lr 0.03 momentum 0.9, batch 64",
    "rnn": "vanilla tanh RNN (50 units, recurrent spectral radius 1.5), addition problem "
           "T=100, SGD lr 0.1, batch 20",
}
STEPS: dict[str, int] = {"mlp": 300, "rnn": 300}
POLICY = "default"


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
class _Setup:
    """Model, optimizer factory, batches and evaluation of one task."""

    def __init__(self, task: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.fresh = torch.Generator().manual_seed(seed + 10_000)
        self.loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.mse_loss
        self.accuracy: Callable[[Tensor, Tensor], float] | None = None
        if task == "mlp":
            self.model: nn.Module = deep_mlp()
            x, y = regression_data(4096, self.gen)
            self.batches: Iterator[tuple[Tensor, Tensor]] = sample(x, y, 64, self.gen)
            self.eval_data = regression_data(2048, self.fresh)
            self.make_opt = lambda params: torch.optim.SGD(params, lr=0.03, momentum=0.9)
        elif task == "rnn":
            self.model = VanillaRNN(2, 1, hidden=50, rho=1.5)
            self.batches = stream(lambda: addition_data(20, 100, self.gen))
            self.eval_data = addition_data(1000, 100, self.fresh)
            self.make_opt = lambda params: torch.optim.SGD(params, lr=0.1)
            self.accuracy = _addition_accuracy
        else:
            raise ValueError(f"`task` must be one of {list(TASKS)}. Received: task={task!r}")

    def evaluate(self) -> tuple[float, float | None]:
        x, y = self.eval_data
        with torch.no_grad():
            out = self.model(x)
            loss = float(self.loss_fn(out, y))
            acc = None if self.accuracy is None else self.accuracy(out, y)
        return loss, acc


def _addition_accuracy(out: Tensor, y: Tensor) -> float:
    """Fraction of sequences with squared error at most 0.04 (Pascanu et al., 2013)."""
    return float(((out - y) ** 2 <= 0.04).float().mean())


def train(task: str, protected: bool, steps: int | None, seed: int,
          on_step: OnStep) -> Outcome:
    """Trains ``task`` once, bare or wrapped with the ``default`` policy.

    Args:
      task: A key of :data:`TASKS`.
      protected: Wrap the optimizer with ``safeopt.wrap(opt, "default")``.
      steps: Number of SGD steps (default: :data:`STEPS`).
      seed: Seed of the data and the initialisation.
      on_step: Called with each step's record; returning ``True`` stops.

    Returns:
      The :class:`~safeopt_bench.demo.Outcome`.
    """
    threads = torch.get_num_threads()
    # The models are tiny: one thread is fastest and does not fight other work.
    torch.set_num_threads(1)
    try:
        return _train(task, protected, STEPS[task] if steps is None else steps, seed, on_step)
    finally:
        torch.set_num_threads(threads)


def _train(task: str, protected: bool, total: int, seed: int, on_step: OnStep) -> Outcome:
    setup = _Setup(task, seed)
    named = list(setup.model.named_parameters())
    names = [name for name, _ in named]
    params = [p for _, p in named]
    opt: Any = setup.make_opt(named)
    if protected:
        opt = safeopt.wrap(opt, POLICY)
    for step in range(total):
        x, y = next(setup.batches)
        loss = setup.loss_fn(setup.model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        tensor_norms = [float(n) for n in torch._foreach_norm(grads)]
        if protected:
            opt.step(loss=loss.detach())
        else:
            opt.step()
        measured = {"step": step, "total": total, "loss": float(loss.detach()),
                    "grad_norm": math.sqrt(sum(n * n for n in tensor_norms)),
                    "tensor_norms": tensor_norms, "weight_norm": _norm(params),
                    "names": names, "wrapped": opt if protected else None}
        if on_step(measured):
            break
    loss_value, accuracy = setup.evaluate()
    stats = safeopt.stats(opt) if protected else None
    diagnosis = _diagnose(opt) if protected else None
    return Outcome(loss_value, accuracy, total, names, stats, diagnosis)


def _norm(params: Sequence[Tensor]) -> float:
    norms = torch._foreach_norm([p.detach() for p in params])
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _diagnose(opt: Any) -> Any:
    return safeopt.diagnose(opt)
