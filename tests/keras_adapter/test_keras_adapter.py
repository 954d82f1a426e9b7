"""The Keras 3 adapter, run the same way on each backend.

Run once per backend::

    KERAS_BACKEND=tensorflow python -m pytest -q tests/keras_adapter
    KERAS_BACKEND=jax python -m pytest -q tests/keras_adapter
    KERAS_BACKEND=torch python -m pytest -q tests/keras_adapter
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
from safeopt.testing import CASES, Trace, check, guarded, snapshot  # noqa: E402

BACKEND = keras.backend.backend()
F32 = np.float32


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------
def _state(opt: Any) -> dict[str, np.ndarray]:
    _, state, _ = sa.read_state(opt)
    return {f: np.asarray(v) for f, v in sa.flatten(state).items()}


# ---------------------------------------------------------------------------
# The wrapper is a Keras optimizer that forwards to the inner one.
# ---------------------------------------------------------------------------
def test_wrap_returns_a_keras_optimizer_that_forwards_lr_and_iterations() -> None:
    inner = keras.optimizers.SGD(learning_rate=0.25)
    opt = safeopt.wrap(inner, {"clip_norm": 2.0})
    assert isinstance(opt, keras.optimizers.Optimizer)
    assert isinstance(opt, safeopt_keras.SafeOptimizer)
    assert opt.inner_optimizer is inner
    assert math.isclose(float(keras.ops.convert_to_numpy(opt.learning_rate)), 0.25)
    opt.learning_rate = 0.5
    assert math.isclose(float(keras.ops.convert_to_numpy(inner.learning_rate)), 0.5)
    var = keras.Variable(np.ones(3, F32))
    opt.apply_gradients([(keras.ops.ones((3,)), var)])
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 1
    assert opt.iterations is inner.iterations
    np.testing.assert_allclose(keras.ops.convert_to_numpy(var), np.full(3, 0.5, F32))


def test_learning_rate_schedule_is_forwarded() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    opt = safeopt.wrap(keras.optimizers.SGD(learning_rate=schedule), {"clip_norm": None})
    var = keras.Variable(np.zeros(2, F32))
    for _ in range(3):
        opt.apply_gradients([(keras.ops.ones((2,)), var)])
    # lr 1, 0.5, 0.25 at iterations 0, 1, 2.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(var), np.full(2, -1.75, F32))
    assert math.isclose(float(keras.ops.convert_to_numpy(opt.learning_rate)), 0.125)


@pytest.mark.parametrize(("kwargs", "remedy"), [
    ({"global_clipnorm": 1.0}, "'norm_scope': 'global'"),
    ({"clipnorm": 1.0}, "'norm_scope': 'per_tensor'"),
    ({"clipvalue": 0.5}, "'clip_value': 0.5"),
])
def test_inner_clipping_is_refused_with_the_remedy(kwargs: dict[str, float],
                                                   remedy: str) -> None:
    inner = keras.optimizers.Adam(1e-3, **kwargs)
    with pytest.raises(ValueError, match="must not clip") as err:
        safeopt.wrap(inner, {"clip_norm": 1.0})
    assert remedy in str(err.value)
    assert next(iter(kwargs)) in str(err.value)


def test_wrapping_twice_or_a_loss_scale_optimizer_is_refused() -> None:
    opt = safeopt.wrap(keras.optimizers.SGD(0.1), "default")
    with pytest.raises(safeopt.AdapterError, match="already wrapped"):
        safeopt.wrap(opt, "default")
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="LossScaleOptimizer"):
        safeopt.wrap(lso, "default")


# ---------------------------------------------------------------------------
# Conformance: the table of safeopt.testing, through SGD(lr=1), eagerly and compiled.
# ---------------------------------------------------------------------------
def _run_case(case: Any, compiled: bool) -> Trace:
    """Runs ``case`` through ``safeopt.wrap(keras.optimizers.SGD(1.0))``.

    Eager: ``apply`` on tensors (TensorFlow eager, JAX's stateful apply, torch).
    Compiled: ``apply`` inside a ``tf.function`` (TensorFlow), ``stateless_apply``
    under ``jax.jit`` (JAX).
    """
    variables = [keras.Variable(p, name=n) for n, p in zip(case.names, case.arrays("params"))]
    opt = safeopt.wrap(keras.optimizers.SGD(learning_rate=1.0), case.policy)
    opt.build(variables)
    apply = compiled_apply(opt, variables) if compiled else (
        lambda grads, loss: opt.apply(grads, variables, loss=loss))
    trace: Trace = []
    for update in case.updates:
        for var, value in zip(variables, case.set_weights(numpy(variables), update)):
            var.assign(value)
        grads = [None if g is None else keras.ops.convert_to_tensor(g)
                 for g in case.grads(update)]
        loss = None if update.loss is None else keras.ops.convert_to_tensor(F32(update.loss))
        error = guarded(lambda grads=grads, loss=loss: apply(grads, loss), lambda: opt)
        trace.append(snapshot(opt, numpy(variables), error))
    return trace


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conformance_eager(case: Any) -> None:
    check(case, _run_case(case, compiled=False))


@pytest.mark.skipif(BACKEND == "torch", reason="the torch backend runs eagerly")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conformance_compiled(case: Any) -> None:
    """``tf.function`` graphs (TensorFlow) and ``jax.jit`` of ``stateless_apply`` (JAX)."""
    check(case, _run_case(case, compiled=True))


# ---------------------------------------------------------------------------
# A skipped step never happened.
# ---------------------------------------------------------------------------
# safeopt's statistics that a skipped step leaves bit-identical. (Fields that hold update
# indices, and the weight norm, whose cadence counts skipped updates too, legitimately
# differ from a run that never saw the skipped batches.)
_STATISTICS = ("counters.steps", "counters.norm_clips", "counters.value_clips",
               "counters.last_norm", "counters.last_scale", "counters.threshold",
               "monitor.layer_norm_ema", "monitor.layer_over_frac", "monitor.layer_count")


def test_nonfinite_batches_in_fit_equal_a_run_without_them() -> None:
    x, y = data(30)
    bad = {4: math.nan, 5: math.inf, 17: -math.inf, 29: math.nan}
    for i, value in bad.items():
        x[i, 2, 3] = value
    policy = {"clip_norm": 1.0, "monitor_every": 2}
    runs = {}
    for name, keep in (("skipped", range(30)), ("left_out", [i for i in range(30)
                                                             if i not in bad])):
        model = mlp()
        opt = safeopt.wrap(keras.optimizers.Adam(1e-2), policy)
        fit(model, opt, x, y, list(keep), steps_per_execution=1 if BACKEND == "torch" else 2)
        runs[name] = (model, opt)
    (m_skip, o_skip), (m_ref, o_ref) = runs["skipped"], runs["left_out"]
    assert_bit_equal(numpy(m_skip.weights), numpy(m_ref.weights), "weights")
    assert_bit_equal(numpy(o_skip.inner_optimizer.variables),
                      numpy(o_ref.inner_optimizer.variables), "inner optimizer variables")
    assert int(keras.ops.convert_to_numpy(o_skip.iterations)) == 26
    s_skip, s_ref = _state(o_skip), _state(o_ref)
    for field in _STATISTICS:
        if field in s_ref:
            np.testing.assert_array_equal(s_skip[field], s_ref[field], err_msg=field)
    stats = safeopt.stats(o_skip)
    assert (stats["skips"], stats["nonfinite"], stats["steps"]) == (4, 4, 26)
    assert stats["norm_clips"] > 0  # the clip was active, so the runs could have differed
    assert all(np.isfinite(w).all() for w in numpy(m_skip.weights))


# ---------------------------------------------------------------------------
# Equivalence with Keras's own features.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("policy", "inner_kwargs"), [
    ({"clip_norm": 0.5, "norm_scope": "global"}, {"global_clipnorm": 0.5}),
    ({"clip_norm": 0.3, "norm_scope": "per_tensor"}, {"clipnorm": 0.3}),
    ({"clip_norm": None, "clip_value": 0.05}, {"clipvalue": 0.05}),
], ids=["global_clipnorm", "clipnorm", "clipvalue"])
def test_clipping_matches_keras(policy: dict[str, Any], inner_kwargs: dict[str, float]) -> None:
    x, y = data(6)
    steps = list(range(6))
    native = mlp()
    fit(native, keras.optimizers.SGD(0.05, momentum=0.9, **inner_kwargs), x, y, steps)
    wrapped = mlp()
    opt = safeopt.wrap(keras.optimizers.SGD(0.05, momentum=0.9), policy)
    fit(wrapped, opt, x, y, steps)
    for got, want in zip(numpy(wrapped.weights), numpy(native.weights)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    stats = safeopt.stats(opt)
    assert stats["norm_clips"] + stats["value_clips"] > 0  # clipping was active


def test_l1_l2_match_keras_regularizers() -> None:
    x, y = data(6)
    steps = list(range(6))
    l1, l2 = 0.01, 0.05
    native = mlp(regularizer=keras.regularizers.L1L2(l1=l1, l2=l2))
    fit(native, keras.optimizers.SGD(0.05), x, y, steps)
    wrapped = mlp()
    fit(wrapped, safeopt.wrap(keras.optimizers.SGD(0.05), {"clip_norm": None, "l1": l1,
                                                            "l2": l2}), x, y, steps)
    plain = mlp()
    fit(plain, keras.optimizers.SGD(0.05), x, y, steps)
    for got, want, off in zip(numpy(wrapped.weights), numpy(native.weights),
                              numpy(plain.weights)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(want, off, rtol=1e-5, atol=1e-6)  # the penalty mattered


# ---------------------------------------------------------------------------
# Compiled steps.
# ---------------------------------------------------------------------------
@pytest.mark.skipif(BACKEND == "torch", reason="torch.compile of the train step is not covered")
def test_jit_compile_fit_matches_the_step_without_xla() -> None:
    x, y = data(4)
    x[1, 0, 0] = math.nan
    results = []
    for jit in (True, False):
        model = mlp()
        opt = safeopt.wrap(keras.optimizers.Adam(1e-2), {"clip_norm": 0.5})
        fit(model, opt, x, y, list(range(4)), jit_compile=jit)
        assert safeopt.stats(opt)["skips"] == 1
        results.append(numpy(model.weights))
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------
def test_get_config_round_trip_nests_the_inner_optimizer() -> None:
    opt = safeopt.wrap(keras.optimizers.Adam(3e-4, beta_1=0.8),
                       {"clip_norm": 2.0, "norm_scope": "unitwise", "l2": 0.1})
    config = keras.optimizers.serialize(opt)
    assert config["registered_name"] == "safeopt>SafeOptimizer"
    assert config["config"]["inner_optimizer"]["class_name"] == "Adam"
    clone = keras.optimizers.deserialize(config)
    assert isinstance(clone, safeopt_keras.SafeOptimizer)
    assert clone.policy == opt.policy
    assert clone.inner_optimizer.get_config() == opt.inner_optimizer.get_config()
    assert type(clone).from_config(opt.get_config()).policy == opt.policy


def test_save_load_resumes_from_the_same_optimizer_state(tmp_path: Any) -> None:
    x, y = data(10)
    x[2, 0, 0] = math.nan  # a skip before the save, so the counters are non-trivial
    policy = {"clip_norm": 0.5, "clip_value": 1.0}
    whole = mlp()
    fit(whole, safeopt.wrap(keras.optimizers.Adam(1e-2), policy), x, y, list(range(10)))

    first = mlp()
    opt = safeopt.wrap(keras.optimizers.Adam(1e-2), policy)
    fit(first, opt, x, y, list(range(5)))
    path = tmp_path / "m.keras"
    first.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, safeopt_keras.SafeOptimizer)
    assert loaded.optimizer.policy == opt.policy
    assert_bit_equal(numpy(loaded.optimizer.variables), numpy(opt.variables),
                      "optimizer variables after load")
    fit(loaded, None, x, y, list(range(5, 10)))
    for got, want in zip(numpy(loaded.weights), numpy(whole.weights)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert safeopt.stats(loaded.optimizer)["skips"] == 1
    assert safeopt.stats(loaded.optimizer)["steps"] == 9


# ---------------------------------------------------------------------------
# Divergence guard and monitor.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("with_guard", [True, False], ids=["guard", "no_guard"])
def test_consecutive_skips_raise_divergence_error(with_guard: bool) -> None:
    if not with_guard and BACKEND != "torch":
        pytest.skip("compiled steps raise through safeopt_keras.DivergenceGuard")
    x, y = data(12)
    x[3:, 0, 0] = math.nan
    model = mlp()
    opt = safeopt.wrap(keras.optimizers.SGD(0.01), {"max_consecutive_skips": 4})
    callbacks = [safeopt_keras.DivergenceGuard()] if with_guard else []
    with pytest.raises(safeopt.DivergenceError) as err:
        fit(model, opt, x, y, list(range(12)), callbacks=callbacks)
    assert err.value.stats["consecutive_skips"] == 4
    assert safeopt.stats(opt)["steps"] == 3
    assert all(np.isfinite(w).all() for w in numpy(model.weights))


def test_monitor_statistics_and_names() -> None:
    x, y = data(7)
    model = mlp()
    opt = safeopt.wrap(keras.optimizers.SGD(0.01), {"clip_norm": 1.0, "monitor_every": 3})
    fit(model, opt, x, y, list(range(7)))
    _, state, extra = sa.read_state(opt)
    assert extra["names"] == [v.path for v in model.trainable_variables]
    assert extra["path"] == f"{BACKEND}-cond"
    norms = np.asarray(state.monitor.layer_norm_ema)
    assert norms.shape == (len(model.trainable_variables),)
    assert (norms > 0).all()
    # Weight norm gathered on applied step 6 (steps 0, 3, 6 are monitor steps),
    # i.e. before the 7th update.
    stats = safeopt.stats(opt)
    assert stats["steps"] == 7
    assert np.isfinite(stats["last_weight_norm"]) and stats["last_weight_norm"] > 0


def test_monitor_weight_norm_is_read_on_monitor_steps_only() -> None:
    variables = [keras.Variable(np.full(4, 1.0, F32))]
    opt = safeopt.wrap(keras.optimizers.SGD(1.0), {"clip_norm": None, "monitor_every": 2})
    seen = []
    for _ in range(3):
        opt.apply_gradients([(keras.ops.ones((4,)), variables[0])])
        seen.append(safeopt.stats(opt).get("last_weight_norm"))
    # Step 0 reads |(1,1,1,1)| = 2; step 1 is not a monitor step; step 2 reads |(-1,...)| = 2.
    assert seen[0] == pytest.approx(2.0)
    assert seen[1] == pytest.approx(2.0)
    variables[0].assign(np.full(4, 3.0, F32))
    opt.apply_gradients([(keras.ops.ones((4,)), variables[0])])  # step 3: no read
    assert safeopt.stats(opt)["last_weight_norm"] == pytest.approx(2.0)
    opt.apply_gradients([(keras.ops.ones((4,)), variables[0])])  # step 4: reads |(2,...)| = 4
    assert safeopt.stats(opt)["last_weight_norm"] == pytest.approx(4.0)


# ---------------------------------------------------------------------------
# Loss scaling and partial variable lists.
# ---------------------------------------------------------------------------
def test_inner_loss_scale_factor_is_taken_over() -> None:
    inner = keras.optimizers.SGD(1.0, loss_scale_factor=128.0)
    opt = safeopt.wrap(inner, {"clip_norm": 1.0})
    assert opt.loss_scale_factor == 128.0 and inner.loss_scale_factor is None
    assert float(keras.ops.convert_to_numpy(opt.scale_loss(keras.ops.ones(())))) == 128.0
    var = keras.Variable(np.zeros(2, F32))
    opt.apply_gradients([(keras.ops.convert_to_tensor(np.array([3.0, 4.0], F32) * 128), var)])
    # Unscaled to (3, 4) before deciding, then clipped to norm 1.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(var), [-0.6, -0.8], rtol=1e-6)
    assert safeopt.stats(opt)["last_norm"] == pytest.approx(5.0)


def test_loss_scale_optimizer_outside_the_wrapper() -> None:
    opt = keras.optimizers.LossScaleOptimizer(
        safeopt.wrap(keras.optimizers.SGD(1.0), {"clip_norm": 1.0}), initial_scale=4.0)
    var = keras.Variable(np.zeros(2, F32))
    opt.build([var])

    def step(grad: list[float]) -> None:
        g = keras.ops.convert_to_tensor(np.array(grad, F32))
        if BACKEND != "jax":
            opt.apply_gradients([(g, var)])
            return
        # LossScaleOptimizer's stateful apply does not run eagerly on JAX; its trainer
        # calls stateless_apply, and so does this test.
        import jax

        new_params, new_opt = jax.jit(opt.stateless_apply)(
            [v.value for v in opt.variables], [g], [var.value])
        var.assign(new_params[0])
        for v, value in zip(opt.variables, new_opt):
            v.assign(value)

    step([12.0, 16.0])  # unscaled by 4 to (3, 4), clipped to norm 1
    np.testing.assert_allclose(keras.ops.convert_to_numpy(var), [-0.6, -0.8], rtol=1e-6)
    step([math.inf, 1.0])  # LossScaleOptimizer skips it before safeopt sees it
    np.testing.assert_allclose(keras.ops.convert_to_numpy(var), [-0.6, -0.8], rtol=1e-6)
    assert safeopt.stats(opt.inner_optimizer)["norm_clips"] == 1


def test_gradients_for_a_subset_of_the_variables() -> None:
    a = keras.Variable(np.ones(2, F32), name="a")
    b = keras.Variable(np.ones(3, F32), name="b")
    opt = safeopt.wrap(keras.optimizers.SGD(1.0), {"clip_norm": None})
    opt.build([a, b])
    opt.apply_gradients([(keras.ops.ones((3,)), b)])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), np.ones(2, F32))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(b), np.zeros(3, F32))
    _, state, _ = sa.read_state(opt)
    assert np.asarray(state.monitor.layer_norm_ema).shape == (2,)
    assert np.asarray(state.monitor.layer_count).tolist() == [0, 1]  # a had no gradient
