"""Recovery in Optax: snapshots in the state, exact restores, back-off, exhaustion, composition."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import safeopt
import safeopt.adapter as sa
import safeopt_optax
from safeopt.testing.cases import STREAK, WEIGHTS

NAN = float("nan")
POLICY = {"recover": True, "snapshot_every": 2, "clip_norm": None, "monitor_every": 1,
          "max_consecutive_skips": 3, "recover_warmup": 4, "recover_lr_factor": 0.25}


def _params() -> dict:
    k1, k2 = jax.random.split(jax.random.key(1))
    return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))}


def _grads(i: int, scale: float = 0.5) -> dict:
    return jax.tree.map(lambda p: scale * jnp.cos(jnp.arange(p.size) + i).reshape(p.shape),
                        _params())


def _nan(tree: dict, value: float = NAN) -> dict:
    return jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(value), tree)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _stepper(tx, *, exact: bool = True, donate: bool = True):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        if exact:
            return safeopt_optax.apply_updates(params, updates, state), state
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _bits_equal(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


class Run:
    """A jitted, donated training loop that keeps what was given to each update."""

    def __init__(self, tx, params=None, **kw) -> None:
        self.tx = tx
        self.params = _params() if params is None else params
        self.state = tx.init(self.params)
        self.step_fn = _stepper(tx, **kw)
        self.before: list = []  # (params, inner state) given to update i

    def step(self, grads, params=None):
        if params is not None:
            self.params = params
        self.before.append((_copy(self.params), _copy(safeopt_optax.find_state(
            self.state).inner)))
        self.params, self.state = self.step_fn(self.params, self.state, grads)
        return self.params


@pytest.mark.parametrize("bad", [NAN, float("inf")], ids=["nan", "inf"])
def test_a_poisoned_weight_is_restored_bit_for_bit(bad):
    run = Run(safeopt.wrap(optax.adam(0.1), POLICY))
    for i in range(3):  # snapshots before updates 0 and 2
        run.step(_grads(i))
    poisoned = _nan(run.params, bad)
    run.step(_grads(3), params=poisoned)  # the weight norm is NaN: restore
    snap_params, snap_inner = run.before[2]
    _bits_equal(run.params, snap_params)
    _bits_equal(run.state.inner, snap_inner)
    stats = safeopt.check(run.state)
    assert stats["recoveries"] == 1
    assert stats["last_recovery"] == {"at": 3, "restored_to": 2, "cause": [WEIGHTS]}
    assert stats["rolled_back"] == 1 and stats["skips"] == 1 and stats["steps"] == 3
    run.step(_grads(4))  # and training goes on from there, without a warning
    assert np.isfinite(np.asarray(run.params["w"])).all()
    assert safeopt.stats(run.state)["steps"] == 4


def test_a_nan_streak_longer_than_the_limit_recovers():
    run = Run(safeopt.wrap(optax.adamw(0.05), POLICY))
    for i in range(3):
        run.step(_grads(i))
    for i in range(3, 6):  # the third NaN update in a row reaches max_consecutive_skips=3
        run.step(_nan(_grads(i)))
        if i < 5:
            _bits_equal(run.params, run.before[3][0])  # skipped: nothing moved
    _bits_equal(run.params, run.before[2][0])
    _bits_equal(run.state.inner, run.before[2][1])
    stats = safeopt.check(run.state)  # recovered: no divergence
    assert (stats["recoveries"], stats["consecutive_skips"], stats["skips"]) == (1, 0, 3)
    assert stats["last_recovery"] == {"at": 5, "restored_to": 2, "cause": [STREAK]}
    assert stats["rolled_back"] == 3


def test_the_backoff_returns_to_one_over_the_warmup():
    lr, factor, warmup = 0.1, POLICY["recover_lr_factor"], POLICY["recover_warmup"]
    tx = safeopt.wrap(optax.sgd(lr), POLICY)
    update = jax.jit(tx.update)
    params = _params()
    state = tx.init(params)
    seen = []
    for i in range(10):
        given = _nan(params) if i == 3 else params  # restore at update 3
        updates, state = update(_grads(i), state, given)
        params = safeopt_optax.apply_updates(given, updates, state)
        plain = jax.tree.map(lambda g: -lr * g, _grads(i))
        if i > 3:
            seen.append(float(updates["b"][1] / plain["b"][1]))
        if i < 3 or i - 3 >= warmup:  # no back-off before, and back to 1: the plain updates
            _bits_equal(updates, plain)
    ramp = [factor + (1 - factor) * min((i - 3) / warmup, 1.0) for i in range(4, 10)]
    np.testing.assert_allclose(seen, ramp, rtol=1e-6)
    assert safeopt.stats(state)["recoveries"] == 1


def test_each_recovery_is_counted_and_running_out_raises():
    policy = {**POLICY, "max_recoveries": 2, "snapshot_every": 1}
    run = Run(safeopt.wrap(optax.sgd(0.1), policy))
    run.step(_grads(0))
    for n in (1, 2):  # two divergences, each restored
        run.step(_grads(n), params=_nan(run.params))
        assert safeopt.check(run.state)["recoveries"] == n
        run.step(_grads(n))
    held = _copy(run.params)
    run.step(_grads(3), params=_nan(run.params))  # the third: none left
    assert np.isnan(np.asarray(run.params["w"])[0, 0])  # not restored, only skipped
    with pytest.raises(safeopt.DivergenceError, match=r"after 2 recoveries \(max_recoveries=2\)"):
        safeopt.check(run.state)
    run.step(_grads(4), params=held)  # the flag is sticky
    with pytest.raises(safeopt.DivergenceError, match="2 recoveries"):
        safeopt.check(run.state)
    assert safeopt.stats(run.state)["recoveries"] == 2


def test_an_unjitted_update_raises_when_the_recoveries_run_out():
    tx = safeopt.wrap(optax.sgd(0.1), {**POLICY, "max_recoveries": 1, "snapshot_every": 1})
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_grads(0), state, params)
    params = safeopt_optax.apply_updates(params, updates, state)
    updates, state = tx.update(_grads(1), state, _nan(params))  # restored
    params = safeopt_optax.apply_updates(_nan(params), updates, state)
    assert safeopt.stats(state)["recoveries"] == 1
    updates, state = tx.update(_grads(2), state, params)
    params = safeopt_optax.apply_updates(params, updates, state)
    with pytest.raises(safeopt.DivergenceError, match="after 1 recovery"):
        tx.update(_grads(3), state, _nan(params))


def test_optax_apply_updates_after_a_restore_is_caught():
    tx = safeopt.wrap(optax.adam(0.1), POLICY)
    run = Run(tx, exact=False)
    for i in range(3):
        run.step(_grads(i))
    run.step(_grads(3), params=_nan(run.params))  # restore, added by optax.apply_updates
    assert np.isnan(np.asarray(run.params["w"])[0, 0])  # NaN + anything is NaN
    run.step(_grads(4))
    with pytest.warns(RuntimeWarning, match=r"restored .* at update 3.*safeopt_optax\.apply_upd"):
        stats = safeopt.stats(run.state)
    assert stats["restore_missed_at"] == 3
    for read in (safeopt.check, safeopt.diagnose):
        with pytest.warns(RuntimeWarning, match="at update 3"):
            read(run.state)
    # un-jitted, the next update refuses at once
    with pytest.raises(ValueError, match="safeopt_optax.apply_updates"):
        tx.update(_grads(5), run.state, run.params)


def test_exact_apply_updates_leaves_nothing_to_report():
    run = Run(safeopt.wrap(optax.adam(0.1), POLICY))
    for i in range(3):
        run.step(_grads(i))
    run.step(_grads(3), params=_nan(run.params))
    run.step(_grads(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = safeopt.stats(run.state)
    assert "restore_missed_at" not in stats and stats["recoveries"] == 1


def test_donated_and_undonated_runs_agree_bit_for_bit():
    tx = safeopt.wrap(optax.adamw(0.05), POLICY)
    runs = [Run(tx, donate=True), Run(tx, donate=False)]
    for run in runs:
        for i in range(3):
            run.step(_grads(i))
        run.step(_grads(3), params=_nan(run.params))
        for i in range(4, 7):
            run.step(_nan(_grads(i)) if i == 5 else _grads(i))
    _bits_equal(runs[0].params, runs[1].params)
    _bits_equal(runs[0].state, runs[1].state)


@pytest.mark.parametrize("exact", [True, False], ids=["exact_apply", "optax_apply"])
def test_donated_recover_step_copies_only_to_snapshot_and_restore(exact):
    """Outside the snapshot and restore branches, XLA keeps every donated buffer in place."""
    tx = safeopt.wrap(optax.adamw(0.01), POLICY)
    params = {"a": jnp.ones((1000,)), "b": jnp.ones((40, 25))}

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return (safeopt_optax.apply_updates(p, u, s) if exact else optax.apply_updates(p, u)), s

    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params) \
        .compile().as_text()
    copies: dict[str, int] = {}
    for computation in re.split(r"\n(?=\S)", text):
        lines = [line for line in computation.splitlines()[1:]
                 if " copy(" in line and ("f32[1000]" in line or "f32[40,25]" in line)]
        if lines:
            copies[computation.split()[0]] = len(lines)
    assert not any(name.startswith("ENTRY") for name in copies), copies
    # the snapshot copies the parameters and both moments; the restore the moments back
    assert sorted(copies.values()) == [4, 6], copies


def test_a_policy_without_recover_keeps_its_leaves():
    params = _params()
    state = safeopt.wrap(optax.adam(0.1)).init(params)
    assert state.snapshot == sa.EMPTY
    bare = (state.safe, state.inner)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(bare))
    held = safeopt.wrap(optax.adam(0.1), {"recover": True}).init(params).snapshot
    assert isinstance(held, safeopt_optax.Snapshot)
    _bits_equal(held.params, params)


def test_update_needs_params_with_recover():
    tx = safeopt.wrap(optax.sgd(0.1), {"recover": True})
    with pytest.raises(ValueError, match="recover=True"):
        tx.update(_grads(0), tx.init(_params()))


# --- composition ---------------------------------------------------------------------------
def test_chain_with_weight_decay_after_the_wrapper_restores_exactly():
    tx = optax.chain(safeopt.wrap(optax.sgd(0.1), POLICY), optax.add_decayed_weights(0.1))
    run = Run(tx)
    for i in range(3):
        run.step(_grads(i))
    run.step(_grads(3), params=_nan(run.params))
    _bits_equal(run.params, run.before[2][0])
    assert safeopt.stats(run.state)["recoveries"] == 1


def test_multisteps_accumulator_comes_back_with_the_snapshot():
    tx = safeopt.wrap(optax.MultiSteps(optax.adam(0.1), every_k_schedule=2), POLICY)
    run = Run(tx)
    for i in range(3):
        run.step(_grads(i))
    run.step(_grads(3), params=_nan(run.params))
    _bits_equal(run.params, run.before[2][0])
    _bits_equal(run.state.inner, run.before[2][1])
    assert int(run.state.inner.mini_step) == 0 and int(run.state.inner.gradient_step) == 1


def test_vmap_restores_each_model_on_its_own():
    tx = safeopt.wrap(optax.sgd(0.1), POLICY)
    batch = jax.tree.map(lambda x: jnp.stack([x, x]), _params())
    state = jax.vmap(tx.init)(batch)

    @jax.jit
    @jax.vmap
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return safeopt_optax.apply_updates(p, u, s), s

    grads = jax.tree.map(lambda x: jnp.stack([x, x]), _grads(0))
    history = []
    for _ in range(3):
        history.append(_copy(batch))
        batch, state = step(batch, state, grads)
    poisoned = jax.tree.map(lambda x: x.at[1].set(x[1] * NAN), batch)  # model 1 only
    batch, state = step(poisoned, state, grads)
    one = jax.tree.map(lambda x: x[1], batch)
    _bits_equal(one, jax.tree.map(lambda x: x[1], history[2]))
    assert np.isfinite(np.asarray(batch["w"][0])).all()
    recoveries = [safeopt.stats(jax.tree.map(lambda x, i=i: x[i], state))["recoveries"]
                  for i in range(2)]
    assert recoveries == [0, 1]


def test_the_snapshot_is_sharded_like_the_parameters():
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
    spec = jax.sharding.PartitionSpec
    shardings = {"w": jax.sharding.NamedSharding(mesh, spec("data", "model")),
                 "b": jax.sharding.NamedSharding(mesh, spec("model"))}
    params = jax.device_put({"w": jnp.ones((8, 16)), "b": jnp.ones((16,))}, shardings)
    tx = safeopt.wrap(optax.adam(0.1), POLICY)
    state = tx.init(params)
    grads = jax.device_put(jax.tree.map(lambda p: p * 0.5, params), shardings)
    new_params, new_state = _stepper(tx, donate=False)(params, state, grads)
    for held in (state.snapshot, new_state.snapshot):
        assert held.params["w"].sharding.is_equivalent_to(shardings["w"], 2)
        assert held.inner[0].mu["w"].sharding.is_equivalent_to(shardings["w"], 2)
    assert new_params["w"].sharding.is_equivalent_to(shardings["w"], 2)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
        assert before.sharding.is_equivalent_to(after.sharding, after.ndim)


def test_flax_nnx_optimizer_is_told_and_the_functional_path_is_exact():
    from flax import nnx

    def loss_fn(m, x):
        return jnp.sum(m(x) ** 2)

    def poisoned(model):
        model.kernel[...] = model.kernel[...].at[0, 0].set(NAN)

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, safeopt.wrap(optax.adam(0.1), POLICY), wrt=nnx.Param)

    @nnx.jit
    def train_step(m, o, x):
        loss, grads = nnx.value_and_grad(loss_fn)(m, x)
        o.update(m, grads, value=loss)

    x = jnp.ones((4, 3))
    for i in range(5):
        if i == 3:
            poisoned(model)
        train_step(model, opt, x)
    with pytest.warns(RuntimeWarning, match="nnx.Optimizer.update"):
        stats = safeopt.stats(opt)
    assert stats["recoveries"] >= 1 and stats["restore_missed_at"] == 3

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))  # nnx.state + safeopt_optax.apply_updates
    tx = safeopt.wrap(optax.adam(0.1), POLICY)
    state = tx.init(nnx.state(model, nnx.Param))

    @nnx.jit
    def exact_step(m, state, x):
        params = nnx.state(m, nnx.Param)
        loss, grads = nnx.value_and_grad(loss_fn)(m, x)
        updates, state = tx.update(grads, state, params, value=loss)
        nnx.update(m, safeopt_optax.apply_updates(params, updates, state))
        return state

    held = []
    for i in range(4):
        if i == 3:
            poisoned(model)
        held.append(jnp.copy(model.kernel[...]))
        state = exact_step(model, state, x)
    _bits_equal(model.kernel[...], held[2])
    assert safeopt.stats(state)["recoveries"] == 1


def test_recovery_cost_benchmark_runs_and_measures_the_snapshot(capsys: pytest.CaptureFixture
                                                                 ) -> None:
    from safeopt_bench import recovery_cost_optax

    out = recovery_cost_optax.main(["--params", "4000", "--tensors", "4", "--rounds", "2"])
    assert set(out) == {"bare", "safeopt", "recover", "snapshot every step"}
    assert out["bare"] == 1.0 and all(np.isfinite(v) and v > 0 for v in out.values())
    params = {"w": jnp.zeros((1000,)), "b": jnp.zeros((3,))}
    # AdamW: the snapshot holds the parameters, both moments and the step count
    extra = recovery_cost_optax.snapshot_bytes(recovery_cost_optax.candidates()["recover"](),
                                               params)
    assert 3 * 1003 * 4 <= extra < 3 * 1003 * 4 + 1024  # and safeopt's small state
    assert "snapshot memory" in capsys.readouterr().out
