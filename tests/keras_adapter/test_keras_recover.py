"""Recovery in Keras: poisoned weights and NaN streaks rolled back bit for bit, on every backend.

Run once per backend (``KERAS_BACKEND=tensorflow|jax|torch``). "eager" is
``apply`` on tensors (TensorFlow eager, JAX's stateful apply, torch);
"compiled" is ``apply`` in a ``tf.function`` (TensorFlow) or
``stateless_apply`` under ``jax.jit`` (JAX); ``model.fit`` runs the
trainers' own compiled steps (``jit_compile`` on and off).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from keras_helpers import assert_bit_equal, compiled_apply, data, fit, mlp, numpy  # noqa: E402

import safeopt  # noqa: E402
import safeopt.adapter as sa  # noqa: E402
import safeopt_keras  # noqa: E402
from safeopt.testing.cases import STREAK, WEIGHTS  # noqa: E402

BACKEND = keras.backend.backend()
F32 = np.float32
NAN = math.nan
POLICY = {"recover": True, "snapshot_every": 2, "clip_norm": None, "monitor_every": 1,
          "max_consecutive_skips": 3, "recover_warmup": 4, "recover_lr_factor": 0.25}
MODES = ["eager"] if BACKEND == "torch" else ["eager", "compiled"]
JIT = [False] if BACKEND == "torch" else [False, True]


class Run:
    """A wrapped optimizer over two variables, stepped eagerly or compiled.

    ``before[i]`` holds the variables and the inner optimizer's variables
    given to update ``i``.
    """

    def __init__(self, inner: Any, policy: dict[str, Any], mode: str) -> None:
        rng = np.random.default_rng(1)
        self.variables = [keras.Variable(rng.normal(size=(4, 3)).astype(F32), name="w"),
                          keras.Variable(rng.normal(size=(3,)).astype(F32), name="b")]
        self.opt = safeopt.wrap(inner, policy)
        self.opt.build(self.variables)
        self.inner = self.opt.inner_optimizer
        self._apply = compiled_apply(self.opt, self.variables) if mode == "compiled" else (
            lambda grads, loss: self.opt.apply(grads, self.variables, loss=loss))
        self.before: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

    def grads(self, i: int, bad: float | None = None) -> list[np.ndarray]:
        """Deterministic gradients for update ``i``; ``bad`` at one element."""
        out = [(0.5 * np.cos(np.arange(int(np.prod(v.shape))) + i)).reshape(v.shape).astype(F32)
               for v in self.variables]
        if bad is not None:
            out[0][0, 0] = bad
        return out

    def poison(self, bad: float = NAN) -> None:
        w = numpy(self.variables[:1])[0]
        w[1, 2] = bad
        self.variables[0].assign(w)

    def step(self, grads: list[np.ndarray]) -> None:
        self.before.append((numpy(self.variables), numpy(self.inner.variables)))
        self._apply([keras.ops.convert_to_tensor(g) for g in grads], None)

    def assert_restored_to(self, update: int) -> None:
        params, inner = self.before[update]
        assert_bit_equal(numpy(self.variables), params, "variables")
        assert_bit_equal(numpy(self.inner.variables), inner, "inner optimizer variables")


class _Record(keras.callbacks.Callback):
    """Keeps the weights and the inner optimizer's variables before each batch."""

    def __init__(self, seen: list[tuple[list[np.ndarray], list[np.ndarray]]]) -> None:
        super().__init__()
        self.seen = seen

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        model = self.model  # on JAX, reading it syncs the trainer's state into the variables
        self.seen.append((numpy(model.trainable_variables),
                          numpy(model.optimizer.inner_optimizer.variables)))


# ---------------------------------------------------------------------------
# Restores, bit for bit.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [NAN, math.inf], ids=["nan", "inf"])
def test_a_poisoned_weight_is_restored_bit_for_bit(bad: float, mode: str) -> None:
    run = Run(keras.optimizers.Adam(0.1), POLICY, mode)
    for i in range(3):  # snapshots before updates 0 and 2
        run.step(run.grads(i))
    run.poison(bad)
    run.step(run.grads(3))  # the weight norm is NaN/Inf: restore
    run.assert_restored_to(2)  # Adam's moments and iterations too
    assert int(keras.ops.convert_to_numpy(run.opt.iterations)) == 2
    stats = safeopt.check(run.opt)
    assert stats["recoveries"] == 1
    assert stats["last_recovery"] == {"at": 3, "restored_to": 2, "cause": [WEIGHTS]}
    assert (stats["rolled_back"], stats["skips"], stats["steps"]) == (1, 1, 3)
    run.step(run.grads(4))  # and training goes on from there
    assert all(np.isfinite(v).all() for v in numpy(run.variables))
    assert safeopt.stats(run.opt)["steps"] == 4


@pytest.mark.parametrize("mode", MODES)
def test_a_nan_streak_longer_than_the_limit_recovers(mode: str) -> None:
    run = Run(keras.optimizers.AdamW(0.05), POLICY, mode)
    for i in range(3):
        run.step(run.grads(i))
    for i in range(3, 6):  # the third NaN update in a row reaches max_consecutive_skips=3
        run.step(run.grads(i, bad=NAN))
        if i < 5:
            run.assert_restored_to(3)  # skipped: nothing moved
    run.assert_restored_to(2)
    stats = safeopt.check(run.opt)  # recovered: no divergence
    assert (stats["recoveries"], stats["consecutive_skips"], stats["skips"]) == (1, 0, 3)
    assert stats["last_recovery"] == {"at": 5, "restored_to": 2, "cause": [STREAK]}
    assert stats["rolled_back"] == 3


@pytest.mark.parametrize("jit_compile", JIT, ids=lambda j: f"jit_{j}")
def test_fit_rolls_a_nan_streak_back_to_the_snapshot(jit_compile: bool) -> None:
    x, y = data(8)
    x[3:6, 0, 0] = NAN  # batches 3, 4, 5: the third reaches max_consecutive_skips=3
    seen: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    model = mlp()
    opt = safeopt.wrap(keras.optimizers.Adam(1e-2), POLICY)
    fit(model, opt, x, y, list(range(6)), jit_compile=jit_compile,
        callbacks=[_Record(seen), safeopt_keras.DivergenceGuard()])
    assert_bit_equal(numpy(model.trainable_variables), seen[2][0], "weights")
    assert_bit_equal(numpy(opt.inner_optimizer.variables), seen[2][1], "Adam's variables")
    stats = safeopt.stats(opt)
    assert stats["recoveries"] == 1
    assert stats["last_recovery"] == {"at": 5, "restored_to": 2, "cause": [STREAK]}
    fit(model, None, x, y, [6, 7])  # goes on, backed off
    assert all(np.isfinite(w).all() for w in numpy(model.weights))
    assert safeopt.stats(opt)["steps"] == 5


# ---------------------------------------------------------------------------
# The learning-rate back-off.
# ---------------------------------------------------------------------------
_INNERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_schedule": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.9)),
    # zero gradients: Adam's own step is 0, only the decoupled weight decay moves
    "adamw_decay": lambda: keras.optimizers.AdamW(0.1, weight_decay=0.5),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inner", sorted(_INNERS))
def test_the_learning_rate_backs_off_and_comes_back(inner: str, mode: str) -> None:
    factor, warmup = POLICY["recover_lr_factor"], POLICY["recover_warmup"]
    run = Run(_INNERS[inner](), {**POLICY, "max_consecutive_skips": 1}, mode)
    plain = Run(_INNERS[inner](), {"clip_norm": None}, mode)  # the same steps, no policy
    seen, rates = [], []
    for i in range(10):
        grads = run.grads(i)
        if inner == "adamw_decay":
            grads = [g * 0 for g in grads]
        if i == 3:
            run.step(run.grads(i, bad=NAN))  # restores the snapshot before update 2
            continue
        for var, value in zip(plain.variables, numpy(run.variables)):
            var.assign(value)
        for var, value in zip(plain.inner.variables, numpy(run.inner.variables)):
            var.assign(value)
        rates.append(float(keras.ops.convert_to_numpy(run.opt.learning_rate)))
        before = numpy(run.variables)
        run.step(grads)
        plain.step(grads)
        want = [p - b for p, b in zip(numpy(plain.variables), before)]
        got = [p - b for p, b in zip(numpy(run.variables), before)]
        if i < 3 or i - 3 >= warmup:  # no back-off: bit for bit the plain step
            assert_bit_equal(numpy(run.variables), numpy(plain.variables), f"update {i}")
        else:
            seen.append(float(np.sum(got[0]) / np.sum(want[0])))
    ramp = [factor + (1 - factor) * min((i - 3) / warmup, 1.0) for i in range(4, 7)]
    np.testing.assert_allclose(seen, ramp, rtol=1e-4)
    # the learning rate read between steps is the optimizer's own (a schedule goes back)
    if inner == "sgd_schedule":
        assert rates[2] == rates[3]  # iterations went back from 3 to 2 with the snapshot
    else:
        assert len(set(rates)) == 1
    assert safeopt.stats(run.opt)["recoveries"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_the_learning_rate_set_by_the_user_is_not_restored(mode: str) -> None:
    run = Run(keras.optimizers.SGD(0.1), {**POLICY, "max_consecutive_skips": 1}, mode)
    for i in range(3):
        run.step(run.grads(i))
    run.opt.learning_rate = 0.02  # a callback's change, after the snapshot
    run.step(run.grads(3, bad=NAN))
    assert_bit_equal(numpy(run.variables), run.before[2][0], "variables")
    assert int(keras.ops.convert_to_numpy(run.opt.iterations)) == 2
    assert float(keras.ops.convert_to_numpy(run.opt.learning_rate)) == pytest.approx(0.02)


# ---------------------------------------------------------------------------
# Counting, running out.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_each_recovery_is_counted_and_running_out_raises(mode: str) -> None:
    run = Run(keras.optimizers.SGD(0.1), {**POLICY, "max_recoveries": 2, "snapshot_every": 1},
              mode)
    run.step(run.grads(0))
    for n in (1, 2):  # two divergences, each restored
        run.poison()
        run.step(run.grads(n))
        assert safeopt.check(run.opt)["recoveries"] == n
        run.step(run.grads(n))
    run.poison()
    message = r"after 2 recoveries \(max_recoveries=2\).*went back to update"
    if BACKEND == "torch":  # eager: the step raises
        with pytest.raises(safeopt.DivergenceError, match=message):
            run.step(run.grads(3))
    else:
        run.step(run.grads(3))
        with pytest.raises(safeopt.DivergenceError, match=message):
            safeopt.check(run.opt)
    assert np.isnan(numpy(run.variables)[0][1, 2])  # not restored, only skipped
    stats = safeopt.stats(run.opt)
    assert stats["recoveries"] == 2 and stats["recovery_exhausted"]
    with pytest.raises(safeopt.DivergenceError, match="2 recoveries"):  # sticky
        safeopt.check(run.opt)


@pytest.mark.parametrize("jit_compile", JIT, ids=lambda j: f"jit_{j}")
def test_fit_stops_once_the_recoveries_have_run_out(jit_compile: bool) -> None:
    x, y = data(12)
    x[2:4, 0, 0] = NAN  # restored at batch 3
    x[6:8, 0, 0] = NAN  # none left at batch 7
    model = mlp()
    opt = safeopt.wrap(keras.optimizers.SGD(0.01), {**POLICY, "max_consecutive_skips": 2,
                                                    "max_recoveries": 1})
    with pytest.raises(safeopt.DivergenceError, match=r"after 1 recovery") as err:
        fit(model, opt, x, y, list(range(12)), jit_compile=jit_compile,
            callbacks=[safeopt_keras.DivergenceGuard()])
    assert err.value.stats["recoveries"] == 1
    assert safeopt.stats(opt)["steps"] == 4  # batches 0, 1 (then rolled back), 4, 5
    assert all(np.isfinite(w).all() for w in numpy(model.weights))


# ---------------------------------------------------------------------------
# Memory and saving.
# ---------------------------------------------------------------------------
def _snapshot_variables(opt: Any) -> list[Any]:
    """The snapshot's variables: the copies of the weights, the inner state, safeopt's state."""
    return [v for v in opt.variables if "safeopt_snapshot" in v.name]


def test_the_snapshot_holds_one_copy_of_the_variables_and_the_inner_state() -> None:
    model = mlp()
    bare = safeopt.wrap(keras.optimizers.Adam(1e-3), {"clip_norm": 1.0})
    held = safeopt.wrap(keras.optimizers.Adam(1e-3), {"clip_norm": 1.0, "recover": True})
    for opt in (bare, held):
        opt.build(model.trainable_variables)
    n_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    extra = _snapshot_variables(held)
    copies = [v for v in extra if not v.name.startswith("safeopt_snapshot_")]
    state = [v for v in extra if v.name.startswith("safeopt_snapshot_")]
    assert len(held.variables) == len(bare.variables) + len(extra) + len(
        held.state_variables().recovery)  # the snapshot and the recovery detector
    assert sum(int(np.prod(v.shape)) for v in copies if "float" in str(v.dtype)) == (
        3 * n_params)  # the weights, Adam's m and v
    ints = [v.name for v in copies if "float" not in str(v.dtype)]
    assert len(ints) == 1 and ints[0].endswith("_iteration_safeopt_snapshot")  # iterations
    assert not any("learning_rate" in v.name for v in copies)
    assert len(state) == len(sa.flatten(held.state_variables()))  # safeopt's whole state


def test_a_saved_recovering_model_loads_and_restores_its_snapshot(tmp_path: Any) -> None:
    x, y = data(10)
    x[6:9, 0, 0] = NAN
    model = mlp()
    opt = safeopt.wrap(keras.optimizers.Adam(1e-2), POLICY)
    fit(model, opt, x, y, list(range(5)))  # snapshots before updates 0, 2, 4
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, safeopt_keras.SafeOptimizer)
    assert_bit_equal(numpy(loaded.optimizer.variables), numpy(opt.variables),
                     "optimizer variables (the snapshot among them)")
    held = numpy(_snapshot_variables(loaded.optimizer)[:len(loaded.trainable_variables)])
    fit(loaded, None, x, y, [5, 6, 7, 8])  # a NaN streak of 3: back to the saved snapshot
    assert_bit_equal(numpy(loaded.trainable_variables), held, "weights")
    last = safeopt.stats(loaded.optimizer)["last_recovery"]
    assert last == {"at": 8, "restored_to": 4, "cause": [STREAK]}


def test_a_file_without_the_snapshot_loads_with_none_held() -> None:
    variables = [keras.Variable(np.ones((2, 2), F32), name="w")]
    opt = safeopt.wrap(keras.optimizers.Adam(0.1), POLICY)
    opt.build(variables)
    for _ in range(3):
        opt.apply([keras.ops.ones((2, 2))], variables)
    store: dict[str, Any] = {}
    opt.save_own_variables(store)
    # safeopt's previous layout (2): the same variables but the snapshot's
    snapshot = {str(i) for i, v in enumerate(opt.variables) if "safeopt_snapshot" in v.name}
    kept = [store[str(i)] for i in range(len(opt.variables)) if str(i) not in snapshot]
    old = {str(i): value for i, value in enumerate(kept)}
    old["safeopt_layout"] = np.int32(2)
    fresh = safeopt.wrap(keras.optimizers.Adam(0.1), POLICY)
    fresh.build(variables)
    fresh.load_own_variables(old)
    assert_bit_equal(numpy(fresh.inner_optimizer.variables),
                     numpy(opt.inner_optimizer.variables), "inner optimizer variables")
    stats = safeopt.stats(fresh)
    assert stats["steps"] == 3
    assert int(keras.ops.convert_to_numpy(fresh.state_variables().recovery.snapshot_at)) == -1
    assert int(keras.ops.convert_to_numpy(opt.state_variables().recovery.snapshot_at)) == 2


def test_without_recover_there_is_no_snapshot() -> None:
    model = mlp()
    opt = safeopt.wrap(keras.optimizers.Adam(1e-3), {"clip_norm": 1.0})
    opt.build(model.trainable_variables)
    assert not _snapshot_variables(opt)
    assert "recoveries" not in safeopt.stats(opt)
