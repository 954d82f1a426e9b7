"""The demo's tasks in PyTorch (imported only by ``safeopt demo --framework torch``).

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
from safeopt._demo import OnStep, Outcome

TASKS: dict[str, str] = {
    "mlp": "deep tanh MLP (12 layers x 64, init std 1.5/sqrt(fan_in)), regression, "
           "SGD lr 0.03 momentum 0.9, batch 64",
    "rnn": "vanilla tanh RNN (50 units, recurrent spectral radius 1.5), addition problem "
           "T=100, SGD lr 0.1, batch 20",
}
STEPS: dict[str, int] = {"mlp": 300, "rnn": 300}
POLICY = "default"
_IN = 20


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------
def regression_data(n: int, gen: torch.Generator, scale: float = 10.0,
                    ) -> tuple[Tensor, Tensor]:
    """``y = scale * tanh(2 x.w / sqrt(d)) + noise``: a smooth target of scale 10."""
    x = torch.randn(n, _IN, generator=gen)
    w = torch.randn(_IN, 1, generator=torch.Generator().manual_seed(1234))
    y = torch.tanh(2.0 * (x @ w) / math.sqrt(_IN)) * scale
    return x, y + 0.1 * scale * torch.randn(n, 1, generator=gen)


def addition_data(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The addition problem (Hochreiter & Schmidhuber, 1997; Pascanu et al., 2013).

    Each step carries a value in [0, 1] and a marker; two steps are marked,
    one in the first 10% of the sequence and one before the middle; the target
    is the sum of the two marked values.
    """
    values = torch.rand(n, length, generator=gen)
    marks = torch.zeros(n, length)
    rows = torch.arange(n)
    first = torch.randint(0, max(length // 10, 1), (n,), generator=gen)
    second = torch.randint(max(length // 10, 1), length // 2, (n,), generator=gen)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    return torch.stack([values, marks], -1), (values * marks).sum(1, keepdim=True)


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------
def deep_mlp(depth: int = 12, width: int = 64, gain: float = 1.5) -> nn.Sequential:
    """A deep tanh MLP with large initial weights (std ``gain / sqrt(fan_in)``)."""
    layers: list[nn.Module] = []
    fan_in = _IN
    for _ in range(depth):
        layers += [_linear(fan_in, width, gain), nn.Tanh()]
        fan_in = width
    layers.append(_linear(fan_in, 1, gain))
    return nn.Sequential(*layers)


def _linear(n_in: int, n_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(n_in))
    nn.init.zeros_(layer.bias)
    return layer


class VanillaRNN(nn.Module):
    """A tanh RNN read out from its last hidden state.

    The recurrent matrix is Gaussian rescaled to spectral radius ``rho``;
    above 1 back-propagation through time can explode (Pascanu et al., 2013).
    """

    def __init__(self, n_in: int, n_out: int, hidden: int = 50, rho: float = 1.5) -> None:
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden, batch_first=True, nonlinearity="tanh")
        self.out = nn.Linear(hidden, n_out)
        with torch.no_grad():
            w = torch.randn(hidden, hidden) / math.sqrt(hidden)
            rnn: Any = self.rnn
            rnn.weight_hh_l0.copy_(w * (rho / torch.linalg.eigvals(w).abs().max()))
            rnn.weight_ih_l0.normal_(0.0, 0.1)
            rnn.bias_hh_l0.zero_()
            rnn.bias_ih_l0.zero_()
            self.out.weight.normal_(0.0, 0.1)
            self.out.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Returns the read-out of the last hidden state."""
        return self.out(self.rnn(x)[0][:, -1])


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
            self.batches: Iterator[tuple[Tensor, Tensor]] = _sample(x, y, 64, self.gen)
            self.eval_data = regression_data(2048, self.fresh)
            self.make_opt = lambda params: torch.optim.SGD(params, lr=0.03, momentum=0.9)
        elif task == "rnn":
            self.model = VanillaRNN(2, 1, hidden=50, rho=1.5)
            self.batches = _stream(lambda: addition_data(20, 100, self.gen))
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


def _sample(x: Tensor, y: Tensor, batch: int, gen: torch.Generator,
            ) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        yield x[idx], y[idx]


def _stream(make: Callable[[], tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield make()


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
      The :class:`~safeopt._demo.Outcome`.
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
    from safeopt._diagnose import diagnose

    return diagnose(opt)
