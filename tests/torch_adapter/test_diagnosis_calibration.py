"""The diagnosis, calibrated: healthy runs get no remedy, exploding runs get a verdict.

Small models on synthetic data, trained a few hundred steps on the CPU:

* healthy: ReLU MLPs with Adam and with SGD on a linear regression (the run
  the diagnosis used to cry wolf on: gradient norms above 1.0 for hundreds
  of updates), a small LSTM, a small transformer, the README's snippet
  model; wrapped with the ``default`` policy, as users run them, or with
  ``off`` (nothing changed, everything monitored);
* exploding: a regression with large targets and plain SGD at too high a
  learning rate (it diverges to NaN), and the demo's tasks trained bare
  (``safeopt_bench.demo``, whatever its tasks are: each is built to explode
  when bare). Their wrapped runs are in the table too: kept finite by
  safeopt, they are exploding-and-handled, so "exploding" there needs the
  NaN/Inf updates safeopt skipped.

The table prints with ``pytest -s``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import Tensor, nn  # noqa: E402

import safeopt  # noqa: E402
from safeopt_bench.demo import load_framework, run_one  # noqa: E402

Batches = Iterator[tuple[Tensor, Tensor]]
ROWS: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the others be
    torch.set_flush_denormal(True)  # saturated tanh layers make slow denormals
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)
    print("\n".join(["", "| run | preset | final loss | verdict | signs | remedies |",
                     "|---|---|---:|---|---|---:|", *ROWS]))


# ---------------------------------------------------------------------------
# Data and models.
# ---------------------------------------------------------------------------
def _sample(x: Tensor, y: Tensor, batch: int, gen: Any) -> Batches:
    while True:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        yield x[idx], y[idx]


def _linear_regression(seed: int, scale: float = 1.0, noise: float = 0.2) -> Batches:
    """``y = scale * x.w + noise`` with 20 inputs (targets of scale ~4.5 when ``scale=1``)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 20, generator=gen)
    y = scale * (x @ torch.randn(20, 1, generator=gen)) + noise * scale * torch.randn(
        2048, 1, generator=gen)
    return _sample(x, y, 64, gen)


def _relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 1))


def _addition(seed: int, length: int = 30) -> Batches:
    """The addition problem (two marked values in [0, 1] to add up)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        values = torch.rand(32, length, generator=gen)
        marks = torch.zeros(32, length)
        rows = torch.arange(32)
        marks[rows, torch.randint(0, length // 10, (32,), generator=gen)] = 1.0
        marks[rows, torch.randint(length // 10, length // 2, (32,), generator=gen)] = 1.0
        yield torch.stack([values, marks], -1), (values * marks).sum(1, keepdim=True)


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 32, batch_first=True)
        self.out = nn.Linear(32, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.lstm(x)[0][:, -1])


class _Transformer(nn.Module):
    """Two pre-norm encoder layers (d=32, 4 heads) that learn to sort ten digits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 32)
        self.pos = nn.Parameter(0.02 * torch.randn(10, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos))


def _sorting(seed: int) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, 10, (32, 10), generator=gen)
        yield x, x.sort(1).values


def _token_loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _snippet_data(seed: int) -> Batches:
    """The README's model fits a smooth target of 32 inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 32, generator=gen)
    y = torch.tanh(x @ torch.randn(32, 1, generator=gen) / 32 ** 0.5)
    return _sample(x, y + 0.05 * torch.randn(1024, 1, generator=gen), 32, gen)


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
def _train(model: nn.Module, make_opt: Callable[[Any], torch.optim.Optimizer], preset: str,
           batches: Batches, loss_fn: Callable[[Tensor, Tensor], Tensor], steps: int,
           pass_loss: bool = True) -> tuple[safeopt.Diagnosis, float]:
    """Trains wrapped by ``preset``; stops a few updates after the loss went NaN/Inf."""
    opt = safeopt.wrap(make_opt(model.named_parameters()), preset)
    losses: list[float] = []
    for _ in range(steps):
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if pass_loss:
            opt.step(loss=loss.detach())
        else:
            opt.step()
        losses.append(float(loss.detach()))
        if sum(not math.isfinite(v) for v in losses) >= 3:
            break
    return safeopt.diagnose(opt), sum(losses[-20:]) / len(losses[-20:])


def _row(name: str, preset: str, loss: float, d: safeopt.Diagnosis) -> str:
    row = (f"| {name} | {preset} | {loss:.3g} | {d.verdict} | "
           f"{''.join(s.letter for s in d.signs) or '-'} | {len(d.remedies)} |")
    ROWS.append(row)
    return f"{row}\n{d}"


HEALTHY: dict[str, Callable[[int, str], tuple[safeopt.Diagnosis, float]]] = {
    "ReLU MLP + Adam": lambda seed, preset: _train(
        _relu_mlp(), lambda p: torch.optim.Adam(p, lr=1e-3), preset, _linear_regression(seed),
        nn.functional.mse_loss, 400),
    "ReLU MLP + SGD": lambda seed, preset: _train(
        _relu_mlp(), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), preset,
        _linear_regression(seed), nn.functional.mse_loss, 400),
    "LSTM + Adam, no loss passed": lambda seed, preset: _train(
        _LSTM(), lambda p: torch.optim.Adam(p, lr=3e-3), preset, _addition(seed),
        nn.functional.mse_loss, 300, pass_loss=False),
    "transformer + AdamW": lambda seed, preset: _train(
        _Transformer(), lambda p: torch.optim.AdamW(p, lr=1e-3), preset, _sorting(seed),
        _token_loss, 300),
    "README snippet + AdamW": lambda seed, preset: _train(
        nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1)),
        lambda p: torch.optim.AdamW(p, lr=1e-3), preset, _snippet_data(seed),
        nn.functional.mse_loss, 300),
}


@pytest.mark.parametrize(("name", "preset"), [(name, p) for name in HEALTHY
                                               for p in ("default", "robust")]
                         + [("ReLU MLP + Adam", "off"), ("ReLU MLP + SGD", "off")])
def test_healthy_runs_get_no_sign_and_no_remedy(name: str, preset: str) -> None:
    torch.manual_seed(0)
    diagnosis, loss = HEALTHY[name](0, preset)
    report = _row(name, preset, loss, diagnosis)
    assert math.isfinite(loss)
    assert diagnosis.verdict == "healthy" and diagnosis.remedies == (), report
    assert "Remedies" not in str(diagnosis)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_with_large_targets_and_too_high_a_learning_rate_explodes(seed: int) -> None:
    torch.manual_seed(seed)
    diagnosis, loss = _train(_relu_mlp(), lambda p: torch.optim.SGD(p, lr=0.02), "off",
                             _linear_regression(seed, scale=10.0, noise=0.1),
                             nn.functional.mse_loss, 200)
    report = _row(f"regression x10, SGD lr 0.02 (seed {seed})", "off", loss, diagnosis)
    assert not math.isfinite(loss)  # it really diverged
    assert diagnosis.verdict == "exploding" and diagnosis.reasons, report
    keys = [r.key for r in diagnosis.remedies]
    assert keys[:2] == ["clip_norm", "lower_lr"], report


DEMO = load_framework("torch")


@pytest.mark.parametrize("task", sorted(DEMO.TASKS))
def test_demo_tasks_explode_bare_and_are_handled_wrapped(task: str) -> None:
    bare = run_one(DEMO, task, False, None, seed=0, stream=io.StringIO())
    d = bare.outcome.diagnosis
    report = _row(f"demo {task}, bare (replayed)", "-", bare.outcome.final_loss, d)
    assert d.verdict == "exploding" and d.reasons and d.remedies, report
    assert d.remedies[0].key == "clip_norm", report
    wrapped = run_one(DEMO, task, True, None, seed=0, stream=io.StringIO())
    d = wrapped.outcome.diagnosis
    report = _row(f"demo {task}", "default", wrapped.outcome.final_loss, d)
    assert math.isfinite(wrapped.outcome.final_loss) and d.clipped > 0, report
    # Handled: clipping holds the gradients, so nothing conclusive is left, unless
    # safeopt had to skip NaN/Inf updates (then "exploding" is the truth, and handled).
    assert d.verdict != "exploding" or d.skipped > 0, report


def test_divergence_is_called_before_any_nan() -> None:
    # Least squares with SGD just past its stability limit (lr 2 / curvature): the loss,
    # the gradients and the weights grow geometrically, still far from overflow after
    # 80 updates. The verdict must come from the runaway signs, not from NaN.
    torch.manual_seed(0)
    diagnosis, loss = _train(nn.Linear(20, 1), lambda p: torch.optim.SGD(p, lr=0.9), "off",
                             _linear_regression(0), nn.functional.mse_loss, 80)
    report = _row("linear least squares, SGD lr 0.9, 80 updates", "off", loss, diagnosis)
    assert math.isfinite(loss) and not diagnosis.fired("a")
    assert diagnosis.verdict == "exploding", report
    assert diagnosis.reasons[0].startswith("from update"), report
