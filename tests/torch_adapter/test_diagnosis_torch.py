"""Diagnosis, adaptive clipping and the divergence guard through the torch adapter."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import safeopt  # noqa: E402


@pytest.fixture(autouse=True)
def _flush_denormals():
    # Saturated tanh layers produce denormal floats, which are very slow on CPU.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)  # torch's default


def _deep_tanh(depth: int = 12, width: int = 32, scale: float = 4.0) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        linear = torch.nn.Linear(width, width)
        torch.nn.init.normal_(linear.weight, std=scale / math.sqrt(width))
        layers += [linear, torch.nn.Tanh()]
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0,
           poison: range = range(0)) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, model[0].in_features, generator=gen)
    y = torch.randn(64, 1, generator=gen)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step in poison:
            loss = loss * float("nan")
        loss.backward()
        opt.step(loss=loss.detach())
        losses.append(float(loss.detach()))
    return losses


def _explosive_run(policy: dict) -> tuple[torch.optim.Optimizer, torch.nn.Module]:
    torch.manual_seed(0)
    model = _deep_tanh()
    opt = safeopt.wrap(torch.optim.SGD(model.named_parameters(), lr=1.0), policy)
    _train(model, opt, steps=40)
    return opt, model


def test_deep_tanh_mlp_explodes_and_diagnosis_names_signs_layers_and_remedy() -> None:
    opt, _ = _explosive_run({"clip_norm": None, "max_consecutive_skips": None})
    diagnosis = safeopt.diagnose(opt)
    assert safeopt.stats(opt)["nonfinite"] > 0  # the bare run really went NaN
    for sign in ("a", "b", "c", "d"):
        assert diagnosis.fired(sign), str(diagnosis)
    assert diagnosis.verdict == "exploding"
    nonfinite = next(s for s in diagnosis.signs if s.key == "nonfinite")
    assert nonfinite.active and nonfinite.since == nonfinite.data["first_nonfinite_step"]
    # The runaway was called before the first NaN/Inf.
    assert diagnosis.reasons[0].startswith("from update")
    grad = next(s for s in diagnosis.signs if s.letter == "d")
    assert grad.since < nonfinite.since
    names = [layer.name for layer in diagnosis.layers]
    assert names and all(n.endswith((".weight", ".bias")) for n in names)
    assert all(layer.growth >= 10.0 and layer.norm > 1.0 for layer in diagnosis.layers)
    assert diagnosis.remedies[0].key == "clip_norm"
    text = str(diagnosis)
    assert "(a)" in text and "(c)" in text and "(d)" in text and names[0] in text
    assert text.index("Clip gradients by norm") < text.index("by value")


def test_deep_tanh_mlp_with_zscore_stays_finite() -> None:
    opt, model = _explosive_run({"adaptive": "zscore"})
    counters = safeopt.stats(opt)
    assert counters["nonfinite"] == 0 and counters["skips"] == 0
    assert counters["norm_clips"] > 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    diagnosis = safeopt.diagnose(opt)
    assert not diagnosis.fired("nonfinite") and not diagnosis.exploding
    assert "the norm clip changed" in str(diagnosis)


def test_stable_run_reports_no_sign_after_200_steps() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = safeopt.wrap(torch.optim.Adam(model.named_parameters(), lr=1e-2), "default")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=gen)
    y = torch.tanh(x @ torch.randn(8, 1, generator=gen) / 8**0.5)  # targets in (-1, 1)
    y = y + 0.05 * torch.randn(512, 1, generator=gen)
    for step in range(200):
        batch = slice((step * 32) % 512, (step * 32) % 512 + 32)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        loss.backward()
        opt.step(loss=loss.detach())
    diagnosis = safeopt.diagnose(opt)
    assert diagnosis.updates == 200
    assert diagnosis.signs == () and diagnosis.verdict == "healthy", str(diagnosis)
    assert "no sign of exploding gradients" in str(diagnosis)


def test_ten_nan_steps_raise_on_the_fifth_skip_with_diagnosis() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = safeopt.wrap(torch.optim.SGD(model.named_parameters(), lr=0.1),
                       {"max_consecutive_skips": 5})
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    calls = 0
    with pytest.raises(safeopt.DivergenceError) as info:
        for step in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if 3 <= step < 13:
                loss = loss * float("nan")
            loss.backward()
            calls += 1
            opt.step(loss=loss.detach())
    assert calls == 3 + 5  # raised by the step that made the fifth skip in a row
    err = info.value
    assert err.stats["consecutive_skips"] == 5
    assert err.diagnosis is not None and err.diagnosis.fired("nonfinite")
    assert err.diagnosis.signs[0].since == 3
    assert "NaN/Inf" in str(err)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_report_from_a_real_wrapped_run(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    from safeopt import telemetry as _telemetry
    from safeopt.cli import main

    log = tmp_path / "run.jsonl"
    torch.manual_seed(0)
    model = _deep_tanh()
    policy = {"clip_norm": 50.0, "max_consecutive_skips": None, "log_every": 2,
              "log_file": str(log), "monitor_every": 2}
    opt = safeopt.wrap(torch.optim.SGD(model.named_parameters(), lr=1.0), policy)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=gen), torch.randn(64, 1, generator=gen)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss.detach())  # the adapter records every log_every steps itself
    _telemetry.close_sinks()
    records = [line for line in log.read_text().splitlines() if line]
    assert len(records) == 30
    png = tmp_path / "run.png"
    assert main(["report", str(log), "--html"]) == 0
    out = capsys.readouterr().out
    assert "safeopt diagnosis after 60 updates" in out
    assert png.stat().st_size > 20_000 and (tmp_path / "run.html").is_file()


def test_lightning_callback_with_a_fake_trainer(tmp_path) -> None:
    from safeopt import telemetry as _telemetry
    from safeopt_torch.lightning import SafeoptLightningCallback

    records: list[dict] = []

    class Collect:
        def write(self, record: dict) -> None:
            records.append(record)

    sink = safeopt.add_sink(Collect())
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = safeopt.wrap(torch.optim.SGD(model.named_parameters(), lr=0.1))

        class LightningOptimizer:  # what Lightning puts in trainer.optimizers
            def __init__(self, optimizer: torch.optim.Optimizer) -> None:
                self._optimizer = optimizer

        class Trainer:
            def __init__(self) -> None:
                self.global_step = 0
                self.optimizers = [LightningOptimizer(opt)]

        callback = SafeoptLightningCallback(log_every=3)
        trainer = Trainer()
        for step in range(1, 10):
            opt.zero_grad()
            loss = model(torch.randn(4, 3)).pow(2).mean()
            loss.backward()
            opt.step()
            trainer.global_step = step
            callback.on_train_batch_end(trainer, None, {"loss": loss}, None, step - 1)
    finally:
        _telemetry.remove_sink(sink)
        _telemetry.close_sinks()
    assert [r["step"] for r in records] == [3, 6, 9]
    assert records[-1]["applied"] == 9 and records[-1]["loss"] is not None
    assert set(records[-1]["layers"]) == {"weight", "bias"}
