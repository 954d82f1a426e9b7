"""The stability benchmark's tasks and protection configurations, in PyTorch.

Tasks:

* ``mlp`` and ``rnn``: the explosive tasks of ``safeopt demo`` (a deep tanh
  MLP with large initial weights on a regression; a vanilla RNN on the
  addition problem at length 100), see :mod:`safeopt._demo_torch`.
* ``addition`` and ``temporal_order``: the pathological problems of Pascanu,
  Mikolov & Bengio (2013), section 5.2 (after Hochreiter & Schmidhuber, 1997),
  at a given sequence length, with a vanilla RNN of 50 tanh units whose
  recurrent weights have spectral radius 1.5, read out from its last state.

Every configuration trains with plain SGD and the same hyper-parameters
(:data:`HYPER`); nothing is tuned per configuration or per seed.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063
  Hochreiter & Schmidhuber (1997), Long short-term memory.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

import safeopt

_IN = 20  # inputs of the regression task

# ---------------------------------------------------------------------------
# Data and models (shared with the torch demo).
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


def sample(x: Tensor, y: Tensor, batch: int, gen: torch.Generator,
           ) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless mini-batches of ``batch`` examples drawn with replacement."""
    while True:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        yield x[idx], y[idx]


def stream(make: Callable[[], tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield make()



#: Shared hyper-parameters of the recurrent problems (every configuration, every seed).
HYPER: dict[str, Any] = {"hidden": 50, "rho": 1.5, "lr": 0.1, "batch": 20, "eval": 1000}
#: Squared error above which an addition sequence counts as wrong (Pascanu et al., 2013).
ADDITION_TOLERANCE = 0.04


def temporal_order_data(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The temporal-order problem (Hochreiter & Schmidhuber, 1997; Pascanu et al., 2013).

    Sequences of distractor symbols {a, b, c, d} (one-hot over 6 symbols)
    carry two relevant symbols, X or Y, one in [10%, 20%) and one in [40%,
    50%) of the length; the class (XX, XY, YX, YY) is their order.
    """
    symbols = torch.randint(0, 4, (n, length), generator=gen)
    first = torch.randint(length // 10, max(2 * length // 10, length // 10 + 1), (n,),
                          generator=gen)
    second = torch.randint(4 * length // 10, max(5 * length // 10, 4 * length // 10 + 1), (n,),
                           generator=gen)
    a = torch.randint(0, 2, (n,), generator=gen)
    b = torch.randint(0, 2, (n,), generator=gen)
    rows = torch.arange(n)
    symbols[rows, first] = 4 + a
    symbols[rows, second] = 4 + b
    return nn.functional.one_hot(symbols, 6).float(), 2 * a + b


# ---------------------------------------------------------------------------
# Configurations: how each run protects (or does not protect) its SGD step.
# ---------------------------------------------------------------------------
Stepper = Callable[[nn.Module, Tensor], None]


def configurations() -> dict[str, Callable[[nn.Module, torch.optim.Optimizer], Stepper]]:
    """``name -> make(model, sgd)`` returning ``step(model, loss)``; peers when installed."""
    configs: dict[str, Callable[[nn.Module, torch.optim.Optimizer], Stepper]] = {
        "none": _bare,
        "clip_grad_norm_(1.0)": _native_clip,
        "safeopt default": lambda m, o: _safeopt(o, "default"),
        "safeopt zscore": lambda m, o: _safeopt(o, {"adaptive": "zscore"}),
    }
    if importlib.util.find_spec("zclip") is not None:
        configs["zclip (peer)"] = _zclip
    if importlib.util.find_spec("smartclip") is not None:
        configs["smartclip ZScoreClip (peer)"] = _smartclip
    return configs


def _bare(model: nn.Module, opt: torch.optim.Optimizer) -> Stepper:
    return lambda m, loss: opt.step()


def _native_clip(model: nn.Module, opt: torch.optim.Optimizer) -> Stepper:
    def step(m: nn.Module, loss: Tensor) -> None:
        nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return step


def _safeopt(opt: torch.optim.Optimizer, policy: Any) -> Stepper:
    wrapped = safeopt.wrap(opt, policy)
    return lambda m, loss: wrapped.step(loss=loss.detach())


def _zclip(model: nn.Module, opt: torch.optim.Optimizer) -> Stepper:
    from zclip import ZClip  # optional peer: pip install zclip

    clip = ZClip(mode="zscore", alpha=0.97, z_thresh=2.5)

    def step(m: nn.Module, loss: Tensor) -> None:
        clip.step(m)
        opt.step()
    return step


def _smartclip(model: nn.Module, opt: torch.optim.Optimizer) -> Stepper:
    import smartclip  # optional peer: pip install smartclip

    clipper = smartclip.ZScoreClip()  # its defaults, like the other configurations

    def step(m: nn.Module, loss: Tensor) -> None:
        smartclip.step(m, opt, clipper)
    return step


# ---------------------------------------------------------------------------
# Tasks.
# ---------------------------------------------------------------------------
class Task:
    """Model, batches, loss and error rate of one task at one length and seed."""

    def __init__(self, name: str, length: int, seed: int) -> None:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        fresh = torch.Generator().manual_seed(seed + 10_000)
        self.loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.mse_loss
        self.wrong: Callable[[Tensor, Tensor], Tensor] = _addition_wrong
        self.lr, self.momentum = HYPER["lr"], 0.0
        batch, n_eval = HYPER["batch"], HYPER["eval"]
        if name == "addition" or name == "rnn":
            length = 100 if name == "rnn" else length
            self.model: nn.Module = VanillaRNN(2, 1, HYPER["hidden"], HYPER["rho"])
            self.batches = stream(lambda: addition_data(batch, length, gen))
            self.eval_data = addition_data(n_eval, length, fresh)
        elif name == "temporal_order":
            self.model = VanillaRNN(6, 4, HYPER["hidden"], HYPER["rho"])
            self.batches = stream(lambda: temporal_order_data(batch, length, gen))
            self.eval_data = temporal_order_data(n_eval, length, fresh)
            self.loss_fn = nn.functional.cross_entropy
            self.wrong = _class_wrong
        elif name == "mlp":
            self.model = deep_mlp()
            x, y = regression_data(4096, gen)
            self.batches = sample(x, y, 64, gen)
            self.eval_data = regression_data(2048, fresh)
            self.wrong = _regression_wrong
            self.lr, self.momentum = 0.03, 0.9
        else:
            raise ValueError(f"`task` must be one of {list(TASKS)}. Received: task={name!r}")

    def evaluate(self) -> tuple[float, float]:
        """``(loss, fraction of examples wrong)`` on fresh data (NaN output is wrong)."""
        x, y = self.eval_data
        with torch.no_grad():
            out = self.model(x)
            return float(self.loss_fn(out, y)), float(self.wrong(out, y).float().mean())


TASKS: dict[str, str] = {
    "mlp": "deep tanh MLP, regression (the demo's; wrong: |error| > 10% of the target scale)",
    "rnn": "vanilla RNN, addition problem T=100 (the demo's)",
    "addition": "addition problem (Pascanu et al. 2013)",
    "temporal_order": "temporal-order problem (Pascanu et al. 2013)",
}


def _addition_wrong(out: Tensor, y: Tensor) -> Tensor:
    return ~((out - y) ** 2 <= ADDITION_TOLERANCE).squeeze(-1)


def _class_wrong(out: Tensor, y: Tensor) -> Tensor:
    return ~(torch.isfinite(out).all(-1) & (out.argmax(-1) == y))


def _regression_wrong(out: Tensor, y: Tensor) -> Tensor:
    return ~((out - y).abs() <= 1.0).squeeze(-1)


# ---------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------
def run(task: str, length: int, config: str, seed: int, steps: int) -> dict[str, Any]:
    """Trains one configuration on one task; returns its row.

    A run whose weights go NaN/Inf stops there (nothing can recover them).
    Success means fewer than 1% of fresh examples wrong.

    Returns:
      ``task``, ``length``, ``config``, ``seed``, ``steps``, ``final_loss``,
      ``error_rate``, ``success``, ``first_nan_step`` and ``seconds``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        t = Task(task, length, seed)
        sgd = torch.optim.SGD(t.model.parameters(), lr=t.lr, momentum=t.momentum)
        step = configurations()[config](t.model, sgd)
        first_nan = None
        for i in range(steps):
            x, y = next(t.batches)
            loss = t.loss_fn(t.model(x), y)
            sgd.zero_grad()
            loss.backward()
            if first_nan is None and not math.isfinite(float(loss.detach())):
                first_nan = i
            step(t.model, loss)
            if not _weights_finite(t.model):
                first_nan = i if first_nan is None else first_nan
                break
        final_loss, error = t.evaluate()
    finally:
        torch.set_num_threads(threads)
    return {"task": task, "length": length if task not in ("mlp", "rnn") else None,
            "config": config, "seed": seed, "steps": steps, "final_loss": final_loss,
            "error_rate": error, "success": error < 0.01, "first_nan_step": first_nan,
            "seconds": time.perf_counter() - start}


def _weights_finite(model: nn.Module) -> bool:
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    return bool(torch.isfinite(torch.stack(norms)).all())


def environment() -> dict[str, str]:
    """Versions and threads, for the report."""
    return {"torch": torch.__version__, "threads": "1 per run"}
