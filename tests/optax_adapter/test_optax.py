"""The Optax adapter: equivalence, conformance, skips, composition, jit/vmap/sharding."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import safeopt
import safeopt_optax
from safeopt.testing import CASES, check, guarded, snapshot

NAN = float("nan")


def _params(seed: int = 0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
            "conv": jax.random.normal(k2, (2, 2, 3, 5)) * 0.1,
            "scale": jax.random.normal(k3, (5,))}


def _grads(step: int, scale: float = 3.0) -> dict:
    return jax.tree.map(lambda p: p * 0 + scale * jnp.sin(jnp.arange(p.size) + step)
                        .reshape(p.shape), _params())


def _poison(tree: dict, value: float) -> dict:
    return jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(value), tree)


def _run(tx, grads_seq, params=None, jit=True):
    params = _params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_equal(a, b, exact=True):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)


# --- equivalence with the native transforms ---------------------------------------------
@pytest.mark.parametrize("clip", [0.5, 1000.0])
def test_global_norm_matches_clip_by_global_norm(clip):
    grads = [_grads(i) for i in range(4)]
    got = _run(safeopt.wrap(optax.adam(0.1), {"clip_norm": clip}), grads)
    want = _run(optax.chain(optax.clip_by_global_norm(clip), optax.adam(0.1)), grads)
    _assert_trees_equal(got[0], want[0], exact=False)
    _assert_trees_equal(got[1].inner, want[1][1], exact=False)


def test_clip_value_matches_optax_clip():
    grads = [_grads(i) for i in range(3)]
    got = _run(safeopt.wrap(optax.sgd(0.1, momentum=0.9),
                            {"clip_norm": None, "clip_value": 0.5}), grads)
    want = _run(optax.chain(optax.clip(0.5), optax.sgd(0.1, momentum=0.9)), grads)
    _assert_trees_equal(got[0], want[0], exact=False)
    assert safeopt.stats(got[1])["value_clips"] == 3


def test_unitwise_matches_adaptive_grad_clip():
    grads = [_grads(i, scale=0.5) for i in range(3)]
    policy = {"clip_norm": 0.05, "norm_scope": "unitwise"}
    got = _run(safeopt.wrap(optax.sgd(0.1), policy), grads)
    want = _run(optax.chain(optax.adaptive_grad_clip(0.05), optax.sgd(0.1)), grads)
    _assert_trees_equal(got[0], want[0], exact=False)
    assert safeopt.stats(got[1])["norm_clips"] > 0


def test_nan_step_matches_apply_if_finite():
    grads = [_grads(0), _poison(_grads(1), NAN), _grads(2)]
    got = _run(safeopt.wrap(optax.adam(0.1), {"clip_norm": None}), grads)
    want = _run(optax.apply_if_finite(optax.adam(0.1), 5), grads)
    _assert_trees_equal(got[0], want[0])
    _assert_trees_equal(got[1].inner, want[1].inner_state)


# --- conformance: the table of safeopt.testing ---------------------------------------------
def _run_case(case):
    """Runs ``case`` through ``safeopt.wrap(optax.sgd(1.0))``, jitted, params as a dict.

    A tensor without a gradient is a leaf masked out of the wrapper
    (``optax.masked(safeopt.wrap(...), mask)``), the Optax way to freeze one.
    The updates are applied with ``safeopt_optax.apply_updates`` (exact restores).
    """
    names = list(case.names)
    present = [all(u.grads[i] is not None for u in case.updates) for i in range(len(names))]
    tx = safeopt.wrap(optax.sgd(1.0), case.policy)
    if not all(present):
        tx = optax.masked(tx, dict(zip(names, present)))
    params = {n: jnp.asarray(a) for n, a in zip(names, case.arrays("params"))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    trace = []
    for u in case.updates:
        params = {n: jnp.asarray(a) for n, a in zip(names, case.set_weights(
            [np.asarray(params[n]) for n in names], u))}
        grads = {n: jnp.zeros_like(params[n]) if g is None else jnp.asarray(g)
                 for n, g in zip(names, case.grads(u))}
        value = None if u.loss is None else jnp.float32(u.loss)
        box = {}

        def step(grads=grads, value=value, params=params, box=box, state=state):
            box["out"] = update(grads, state, params, value=value)

        error = guarded(step, lambda box=box: box["out"][1])
        updates, state = box["out"]
        params = jax.jit(safeopt_optax.apply_updates)(params, updates, state)
        trace.append(snapshot(state, [np.asarray(params[n]) for n in names], error))
    return trace


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conformance(case):
    if "no_grad_sometimes" in case.needs:
        pytest.skip("a JAX gradient tree has every leaf on every update")
    check(case, _run_case(case))


# --- a skipped update never happened ------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: optax.adamw(0.05), lambda: optax.sgd(0.1, 0.9),
                                  lambda: optax.inject_hyperparams(optax.adam)(0.05)],
                         ids=["adamw", "sgd_momentum", "inject_hyperparams"])
def test_skipped_steps_are_bit_identical_to_leaving_batches_out(make):
    bad = {3: NAN, 7: jnp.inf, 8: -jnp.inf}
    seq = [_poison(_grads(i), bad[i]) if i in bad else _grads(i) for i in range(12)]
    clean = [g for i, g in enumerate(seq) if i not in bad]
    policy = {"clip_norm": 1.0, "clip_value": 2.0}
    got_p, got_s = _run(safeopt.wrap(make(), policy), seq)
    want_p, want_s = _run(safeopt.wrap(make(), policy), clean)
    _assert_trees_equal(got_p, want_p)
    _assert_trees_equal(got_s.inner, want_s.inner)
    stats = safeopt.stats(got_s)
    assert (stats["skips"], stats["nonfinite"], stats["steps"]) == (3, 3, 9)
    assert stats["last_norm"] == safeopt.stats(want_s)["last_norm"]


def test_nan_loss_skips_and_has_no_limit():
    tx = safeopt.wrap(optax.sgd(0.1), {"max_consecutive_skips": None})
    params, state = _run(tx, [_poison(_grads(i), NAN) for i in range(30)])
    _assert_trees_equal(params, _params())
    assert safeopt.stats(state)["consecutive_skips"] == 30


def test_divergence_raised_at_fifth_skip():
    tx = safeopt.wrap(optax.adam(0.1), {"max_consecutive_skips": 5})
    params = _params()
    state = tx.init(params)
    jitted = jax.jit(tx.update)
    for step in range(10):  # jitted: the counter is the flag, check() raises
        _, state = jitted(_poison(_grads(step), NAN), state, params)
        if step < 4:
            safeopt.check(state)
        else:
            with pytest.raises(safeopt.DivergenceError):
                safeopt.check(state)
            break
    state = tx.init(params)
    for step in range(10):  # un-jitted: update itself raises at the 5th skip
        if step == 4:
            with pytest.raises(safeopt.DivergenceError) as err:
                tx.update(_poison(_grads(step), NAN), state, params)
            assert err.value.stats["consecutive_skips"] == 5
            break
        _, state = tx.update(_poison(_grads(step), NAN), state, params)
    assert step == 4


# --- params, loss, errors ----------------------------------------------------------------
def test_params_missing_raises_clear_error():
    tx = safeopt.wrap(optax.sgd(0.1), {"l2": 0.1})
    with pytest.raises(ValueError, match="params"):
        tx.update(_grads(0), tx.init(_params()))


def test_loss_reaches_inner_and_state():
    inner = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1))
    tx = safeopt.wrap(inner, {"clip_norm": 1.0})
    params = _params()
    state = tx.init(params)
    _, state = jax.jit(tx.update)(_grads(0), state, params, value=jnp.float32(2.5))
    stats = safeopt.stats(state)
    assert stats["last_loss"] == 2.5
    assert stats["names"] == ["['conv']", "['dense']['bias']", "['dense']['kernel']", "['scale']"]
    assert stats["path"] == "jit"


def test_wrap_refuses_double_wrap_and_stats_needs_state():
    tx = safeopt.wrap(optax.sgd(0.1))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    with pytest.raises(safeopt.AdapterError, match="already wrapped"):
        safeopt.wrap(tx)
    with pytest.raises(TypeError, match="opt_state"):
        safeopt.stats(tx)


def test_weight_norm_gathered_on_monitor_steps():
    tx = safeopt.wrap(optax.sgd(0.1), {"monitor_every": 3})
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = []
    for step in range(4):
        updates, state = update(_grads(step, 0.01), state, params)
        if step == 0:
            want = float(optax.tree.norm(params))
        params = optax.apply_updates(params, updates)
        seen.append(safeopt.stats(state).get("last_weight_norm"))
    assert seen[0] == pytest.approx(want, rel=1e-6)
    assert seen[0] == seen[1] == seen[2] != seen[3]


# --- composition ---------------------------------------------------------------------------
def test_multisteps_skipped_mini_step_leaves_accumulator():
    bad = {2: NAN}
    seq = [_poison(_grads(i), bad[i]) if i in bad else _grads(i) for i in range(7)]
    clean = [g for i, g in enumerate(seq) if i not in bad]

    def make():
        return safeopt.wrap(optax.MultiSteps(optax.adam(0.1), every_k_schedule=3),
                            {"clip_norm": 1.0})

    got_p, got_s = _run(make(), seq)
    want_p, want_s = _run(make(), clean)
    _assert_trees_equal(got_p, want_p)
    _assert_trees_equal(got_s.inner, want_s.inner)
    assert int(got_s.inner.gradient_step) == 2


def test_chain_state_inside_is_found_by_stats():
    tx = optax.chain(safeopt.wrap(optax.sgd(0.1)), optax.scale(1.0))
    _, state = _run(tx, [_poison(_grads(0), NAN)])
    assert safeopt.stats(state)["skips"] == 1


def test_nnx_optimizer_passes_value_through():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, safeopt.wrap(optax.adam(0.1), {"clip_norm": 0.1}), wrt=nnx.Param)

    def loss_fn(m, x):
        return jnp.sum(m(x) ** 2)

    @nnx.jit
    def train_step(m, o, x):
        loss, grads = nnx.value_and_grad(loss_fn)(m, x)
        o.update(m, grads, value=loss)
        return loss

    loss = train_step(model, opt, jnp.ones((4, 3)))
    stats = safeopt.stats(opt)
    assert stats["steps"] == 1 and stats["last_loss"] == pytest.approx(float(loss))
    assert stats["names"] == ["['bias']", "['kernel']"]
    train_step(model, opt, jnp.full((4, 3), jnp.nan))
    assert safeopt.stats(opt)["skips"] == 1
    assert bool(jnp.isfinite(model.kernel[...]).all())


# --- jit, vmap, sharding, abstract init, checkpoints -------------------------------------------
def test_jit_with_donated_buffers():
    tx = safeopt.wrap(optax.adamw(0.01), {"clip_norm": 1.0})

    @jax.jit
    def ref_step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(ref_step, donate_argnums=(0, 1))
    params, state = _params(), tx.init(_params())
    want_p, want_s = ref_step(params, state, _grads(0))
    params, state = step(params, state, _grads(0))
    _assert_trees_equal(params, want_p)
    _assert_trees_equal(state, want_s)


def test_vmap_over_independent_models():
    tx = safeopt.wrap(optax.adam(0.1), {"clip_norm": 1.0})
    batch = jax.tree.map(lambda x: jnp.stack([x, x]), _params())
    grads = jax.tree.map(lambda a, b: jnp.stack([a, b]), _grads(0), _poison(_grads(0), NAN))
    state = jax.vmap(tx.init)(batch)
    updates, state = jax.jit(jax.vmap(tx.update))(grads, state, batch)
    one = jax.tree.map(lambda x: x[0], state)
    two = jax.tree.map(lambda x: x[1], state)
    assert safeopt.stats(one)["steps"] == 1 and safeopt.stats(two)["skips"] == 1
    assert all(bool((u[1] == 0).all()) and bool((u[0] != 0).any())
               for u in jax.tree.leaves(updates))
    with pytest.raises(ValueError, match="batched"):
        safeopt.stats(state)


def test_sharded_params_keep_state_shardings():
    devices = jax.devices()
    assert len(devices) == 8, "tests/optax_adapter/conftest.py sets 8 host devices"
    mesh = jax.sharding.Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
    spec = jax.sharding.PartitionSpec
    params = {"w": jnp.ones((8, 16)), "b": jnp.ones((16,))}
    shardings = {"w": jax.sharding.NamedSharding(mesh, spec("data", "model")),
                 "b": jax.sharding.NamedSharding(mesh, spec("model"))}
    params = jax.device_put(params, shardings)
    tx = safeopt.wrap(optax.adam(0.1), {"clip_norm": 1.0})
    state = tx.init(params)
    grads = jax.device_put(jax.tree.map(lambda p: p * 3.0, params), shardings)
    _, new_state = jax.jit(tx.update, donate_argnums=(1,))(grads, state, params)
    before = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state))
    after = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, new_state))
    leaves = jax.tree.leaves(new_state)
    for b, a, x in zip(before, after, leaves):
        assert b.is_equivalent_to(a, x.ndim), (b, a)
    assert new_state.inner[0].mu["w"].sharding.is_equivalent_to(shardings["w"], 2)
    assert safeopt.stats(new_state)["norm_clips"] == 1


def test_init_on_shape_dtype_structs():
    tx = safeopt.wrap(optax.adamw(0.1), {"clip_norm": 1.0})
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), _params())
    shapes = jax.eval_shape(tx.init, abstract)
    real = tx.init(_params())
    assert jax.tree.structure(shapes) == jax.tree.structure(real)
    for s, r in zip(jax.tree.leaves(shapes), jax.tree.leaves(real)):
        assert (s.shape, s.dtype) == (r.shape, r.dtype)


def test_checkpoint_round_trip(tmp_path):
    tx = safeopt.wrap(optax.adam(0.1), {"clip_norm": 1.0})
    seq = [_grads(0), _poison(_grads(1), NAN), _grads(2)]
    params, state = _run(tx, seq)
    # flax.serialization with a target
    restored = flax.serialization.from_bytes(tx.init(_params()),
                                             flax.serialization.to_bytes(state))
    _assert_trees_equal(restored, state)
    # plain leaves in an .npz, unflattened onto the structure of init
    leaves = jax.tree.leaves(state)
    np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in leaves])
    with np.load(tmp_path / "ckpt.npz") as data:
        loaded = [data[f"arr_{i}"] for i in range(len(leaves))]
    restored = jax.tree.unflatten(jax.tree.structure(tx.init(_params())), loaded)
    np.testing.assert_equal(safeopt.stats(restored), safeopt.stats(state))
    p1, s1 = jax.jit(tx.update)(_grads(3), state, params)
    p2, s2 = jax.jit(tx.update)(_grads(3), restored, params)
    _assert_trees_equal((p1, s1), (p2, s2))


@pytest.mark.parametrize("policy", [{"clip_norm": 1.0}, {"clip_norm": 1.0, "monitor_every": 1}])
def test_donated_step_writes_no_copy_of_params_or_moments(policy):
    """The skip select and the weight-norm cond must not make XLA copy donated buffers."""
    tx = safeopt.wrap(optax.adamw(0.01), policy)
    params = {"a": jnp.ones((1000,)), "b": jnp.ones((40, 25))}

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    text = hlo.compile().as_text()
    entry = text[text.index("ENTRY"):]
    big = [line for line in entry.splitlines()
           if " copy(" in line and ("f32[1000]" in line or "f32[40,25]" in line)]
    assert not big, big


def test_skip_select_falls_back_when_jax_internals_change(monkeypatch):
    from safeopt_optax import _select

    def broken(*args, **kwargs):
        raise NotImplementedError("new jaxpr format")

    bad = {2: NAN}
    seq = [_poison(_grads(i), bad[i]) if i in bad else _grads(i) for i in range(5)]
    want_p, want_s = _run(safeopt.wrap(optax.adamw(0.05)), seq)
    monkeypatch.setattr(_select, "_eval_selected", broken)
    with pytest.warns(RuntimeWarning, match="falling back to a plain select"):
        got_p, got_s = _run(safeopt.wrap(optax.adamw(0.05)), seq)
    _assert_trees_equal(got_p, want_p)
    _assert_trees_equal(got_s.inner, want_s.inner)
