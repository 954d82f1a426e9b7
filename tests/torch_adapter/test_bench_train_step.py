"""The whole-training-step benchmark: its candidates, their models and batches, its output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F

import safeopt
from safeopt_bench import train_step_torch as bench
from safeopt_torch import SafeOptimizer

TINY = bench.Shape(d_model=16, layers=1, heads=2, context=8, batch=2)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_main_prints_and_writes_the_three_candidates(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "train_step.json"
    bench.main(["--rounds", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
                "--context", "8", "--batch", "2", "--threads", "1", "--json", str(out)])
    assert torch.get_num_threads() == threads  # --threads does not leak out of main
    data = json.loads(out.read_text())
    assert list(data["candidates"]) == ["bare", "safeopt", "clip_grad_norm_"]
    for row in data["candidates"].values():
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert data["candidates"]["bare"]["ratio"] == 1.0
    assert data["threads"] == 1 and data["rounds"] == 2 and data["target"] == 1.02
    assert data["params"] == sum(p.numel() for p in bench._model(TINY, 0).parameters())
    # The protected candidate is a safeopt wrapper that took every step (warm-up included).
    stats = data["safeopt_stats"]
    assert stats["steps"] == data["warmup"] + 2 and stats["skips"] == 0
    assert stats["path"] == "fused" and stats["last_loss"] is not None
    printed = capsys.readouterr().out
    for name in ("bare", "safeopt", "clip_grad_norm_"):
        assert f"| {name} | " in printed
    assert "<= 1.02x" in printed and f"safeopt: {stats['steps']} steps" in printed


def test_candidates_own_copies_of_one_model_and_see_the_same_batches() -> None:
    run = bench.build(TINY, seed=3)
    assert isinstance(run.wrapped, SafeOptimizer)
    start = {name: _flat(m) for name, m in run.models.items()}
    assert torch.equal(start["bare"], start["safeopt"])
    assert torch.equal(start["bare"], start["clip_grad_norm_"])
    # The first batch, on the shared initial weights: the loss the wrapper must receive.
    x, y = bench._Batches(TINY, 3 + 1).stream()()
    with torch.no_grad():
        expected = F.cross_entropy(bench._model(TINY, 3)(x).flatten(0, 1), y.flatten())

    run.steps["bare"]()
    assert not torch.equal(_flat(run.models["bare"]), start["bare"])
    assert torch.equal(_flat(run.models["safeopt"]), start["safeopt"])  # untouched
    run.steps["safeopt"]()
    stats = safeopt.stats(run.wrapped)
    assert stats["steps"] == 1
    assert stats["last_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert not torch.equal(_flat(run.models["safeopt"]), start["safeopt"])
    assert torch.equal(_flat(run.models["clip_grad_norm_"]), start["clip_grad_norm_"])


def test_default_shape_is_the_documented_size() -> None:
    model = bench._model(bench.Shape(), 0)
    params = list(model.parameters())
    assert 9_500_000 < sum(p.numel() for p in params) < 9_700_000  # "about 9.6M"
    assert len(params) == 149


def test_heads_must_divide_d_model() -> None:
    with pytest.raises(ValueError, match=r"`d_model` must be a multiple of `heads` \(3\)"):
        bench.build(bench.Shape(d_model=16, layers=1, heads=3, context=8, batch=2))
    with pytest.raises(SystemExit):
        bench.main(["--d-model", "16", "--heads", "3", "--rounds", "1"])



def test_norm_experiment_reads_the_same_norm_at_step_time_and_in_hooks() -> None:
    built = bench.build(TINY, experiments=True)
    assert list(built.steps) == [*bench.CANDIDATES, *bench.EXPERIMENTS]
    models = {name: bench._model(TINY, 0) for name in bench.EXPERIMENTS}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    updates = bench._norm_updates(models, opts)
    x = torch.randint(0, 256, (TINY.batch, TINY.context + 1), generator=torch.Generator())
    for name, model in models.items():
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        want = torch.stack([p.grad.norm() for p in model.parameters()]).square().sum()
        got = updates[name](torch.zeros(()))  # reads the norm, then takes the bare step
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(_flat(models["norm at step"]), _flat(models["norm in hooks"]))
