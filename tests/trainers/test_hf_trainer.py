"""safeopt in a real Hugging Face ``Trainer``: a tiny GPT-2 built from a config, no downloads."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import safeopt  # noqa: E402
from safeopt_torch.hf import LOGGED, SafeoptCallback, add_callback, optimizer_class  # noqa: E402

transformers.logging.set_verbosity_error()
NAN_STEP = 2  # the optimizer step (0-based) whose gradients the tests poison


def _model() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _data() -> list[dict[str, Any]]:
    ids = torch.randint(0, 64, (40, 8), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(tmp_path: Any, **kwargs: Any) -> Any:
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 5,
            "logging_steps": 1, "learning_rate": 1e-3, "report_to": [], "save_strategy": "no",
            "use_cpu": True, "disable_tqdm": True, "max_grad_norm": 0.0}
    return transformers.TrainingArguments(**{**base, **kwargs})


def _trainer(tmp_path: Any, policy: Any = None, callbacks: Any = (), **kwargs: Any) -> Any:
    model = _model()
    optimizer = safeopt.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), policy)
    return transformers.Trainer(model=model, args=_args(tmp_path, **kwargs),
                                train_dataset=_data(), optimizers=(optimizer, None),
                                callbacks=list(callbacks))


def _train_logs(trainer: Any) -> list[dict[str, Any]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class _Poison(transformers.TrainerCallback):
    """Makes one step's gradients NaN, after Trainer's clipping, before the step."""

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              **kwargs: Any) -> None:
        if state.global_step == NAN_STEP:
            next(model.parameters()).grad.fill_(math.nan)


class _Recorder(transformers.TrainerCallback):
    """Keeps the logs each ``on_log`` sees, as a reporting integration would."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               **kwargs: Any) -> None:
        self.seen.append(dict(logs))


# ---------------------------------------------------------------------------
def test_trainer_clipping_on_top_of_a_clipping_policy_is_refused_with_the_remedy(
        tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0 with the policy's \{'clip_norm': "
                       r"1.0\}.*TrainingArguments\(max_grad_norm=0.0\).*\{'clip_norm': None\}"):
        _trainer(tmp_path, callbacks=[SafeoptCallback()], max_grad_norm=1.0)
    # Trainer building the optimizer: refused when training starts.
    trainer = transformers.Trainer(
        model=_model(), args=_args(tmp_path, max_grad_norm=0.5), train_dataset=_data(),
        optimizer_cls_and_kwargs=(optimizer_class(torch.optim.SGD, {"clip_value": 0.1}),
                                  {"lr": 0.1}),
        callbacks=[SafeoptCallback()])
    with pytest.raises(ValueError, match=r"max_grad_norm=0.5 .*'clip_value': 0.1"):
        trainer.train()
    # A policy that does not clip leaves the clipping to Trainer.
    _trainer(tmp_path, {"clip_norm": None}, callbacks=[SafeoptCallback()], max_grad_norm=1.0)


def test_a_callback_on_an_optimizer_safeopt_did_not_wrap_is_refused(tmp_path: Any) -> None:
    model = _model()
    with pytest.raises(ValueError, match="made by safeopt.wrap. Received: AdamW"):
        transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                             optimizers=(torch.optim.AdamW(model.parameters()), None),
                             callbacks=[SafeoptCallback()])


@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["num_items_in_batch", "mean"])
def test_the_loss_reaches_the_policy_as_trainer_logs_it(tmp_path: Any,
                                                         loss_kwargs: bool) -> None:
    trainer = _trainer(tmp_path, callbacks=[SafeoptCallback()], gradient_accumulation_steps=2,
                       max_steps=3)
    # With loss kwargs the model normalises each micro-batch loss over the accumulated
    # batch (the step's loss is their sum); without, each is a mean (their mean).
    trainer.model_accepts_loss_kwargs = loss_kwargs
    trainer.train()
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    stats = safeopt.stats(trainer.optimizer)
    assert stats["steps"] == 3 and math.isfinite(stats["last_loss"])
    assert stats["last_loss"] == pytest.approx(_train_logs(trainer)[-1]["loss"], rel=1e-5)
    assert safeopt.check(trainer.optimizer)["steps"] == 3
    assert "safeopt diagnosis after 3 updates" in str(safeopt.diagnose(trainer.optimizer))


def test_without_the_callback_the_policy_gets_no_loss(tmp_path: Any) -> None:
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.train()
    assert safeopt.stats(trainer.optimizer)["last_loss"] is None


@pytest.mark.parametrize("aware", [True, False])
def test_a_skipped_step_does_not_advance_the_lr_schedule(tmp_path: Any, aware: bool) -> None:
    trainer = _trainer(tmp_path, callbacks=[SafeoptCallback(skip_aware_scheduler=aware),
                                            _Poison()])
    trainer.train()
    logs = _train_logs(trainer)
    rates = [entry["learning_rate"] for entry in logs]  # read before each scheduler step
    linear = [1e-3 * (1 - k / 5) for k in range(5)]
    want = linear[:NAN_STEP + 1] + linear[NAN_STEP:4] if aware else linear
    assert rates == pytest.approx(want)
    assert [entry["safeopt/skips"] for entry in logs] == [0, 0, 1, 1, 1]
    assert logs[-1]["safeopt/nonfinite"] == 1 and set(LOGGED) <= {
        key.removeprefix("safeopt/") for key in logs[-1]}
    assert "step" not in vars(trainer.lr_scheduler)  # its own step is back
    assert safeopt.stats(trainer.optimizer)["skips"] == 1


def test_optimizer_class_keeps_trainers_parameter_groups(tmp_path: Any) -> None:
    trainer = transformers.Trainer(
        model=_model(), args=_args(tmp_path, weight_decay=0.1, max_steps=3),
        train_dataset=_data(), callbacks=[SafeoptCallback()],
        optimizer_cls_and_kwargs=(optimizer_class(torch.optim.AdamW, {"clip_norm": 1e-3}),
                                  {"lr": 1e-3, "fused": True}))
    trainer.train()
    safe = trainer.optimizer.optimizer
    assert type(safe).__name__ == "SafeAdamW" and type(safe.inner) is torch.optim.AdamW
    assert [group["weight_decay"] for group in safe.param_groups] == [0.1, 0.0]
    stats = safeopt.stats(trainer.optimizer)
    assert stats["path"] == "fused" and stats["norm_clips"] == 3
    assert stats["last_loss"] == pytest.approx(_train_logs(trainer)[-1]["loss"], rel=1e-5)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer class"):
        optimizer_class(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))


def test_counters_reach_the_reporters_when_the_callback_comes_first(tmp_path: Any) -> None:
    late, first = _Recorder(), _Recorder()
    trainer = _trainer(tmp_path, callbacks=[late, SafeoptCallback()], max_steps=2)
    trainer.train()
    assert all("safeopt/norm_clips" in entry for entry in _train_logs(trainer))
    assert not any("safeopt/norm_clips" in logs for logs in late.seen)  # ran before it
    trainer = _trainer(tmp_path, callbacks=[first], max_steps=2)
    callback = add_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    seen = [logs for logs in first.seen if "loss" in logs]
    # Trainer's grad_norm is the norm before the step: above clip_norm = 1, safeopt clipped.
    want = list(itertools.accumulate(int(logs["grad_norm"] > 1.0) for logs in seen))
    assert [logs["safeopt/norm_clips"] for logs in seen] == want and want[-1] > 0


def test_a_model_without_loss_in_its_outputs_warns_or_refuses_spike_skip(
        tmp_path: Any) -> None:
    def loss_func(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))

    for policy in (None, {"spike_skip": "loss"}):
        model = _model()
        trainer = transformers.Trainer(
            model=model, args=_args(tmp_path, max_steps=2), train_dataset=_data(),
            optimizers=(safeopt.wrap(torch.optim.AdamW(model.parameters()), policy), None),
            callbacks=[SafeoptCallback()], compute_loss_func=loss_func)
        if policy is None:
            with pytest.warns(RuntimeWarning, match="saw no loss"):
                trainer.train()
            assert safeopt.stats(trainer.optimizer)["last_loss"] is None
        else:
            with pytest.raises(ValueError, match="spike_skip='loss'` needs it"):
                trainer.train()


def test_a_policy_that_never_skips_reads_no_skip_flag(tmp_path: Any, monkeypatch: Any) -> None:
    from safeopt_torch import SafeOptimizer

    def unread(self: Any) -> bool:
        raise AssertionError("last_step_skipped read for a policy that cannot skip")

    monkeypatch.setattr(SafeOptimizer, "last_step_skipped", property(unread))
    trainer = _trainer(tmp_path, {"skip_nonfinite": False}, callbacks=[SafeoptCallback()],
                       max_steps=2)
    trainer.train()
    assert safeopt.stats(trainer.optimizer)["steps"] == 2
