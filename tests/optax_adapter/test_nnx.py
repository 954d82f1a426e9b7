"""flax nnx: ``nnx.Optimizer`` around a wrapped Optax transformation, under ``nnx.jit``.

The README's example, run as written there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import safeopt


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def _params(model: nnx.Module) -> list[np.ndarray]:
    return [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_nnx_optimizer_under_nnx_jit() -> None:
    model = _MLP(nnx.Rngs(0))
    # --- as in the README --------------------------------------------------------
    optimizer = nnx.Optimizer(model, safeopt.wrap(optax.adamw(1e-2), {"clip_norm": 1.0}),
                              wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return ((model(x) - y) ** 2).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, value=loss)  # the loss reaches the policy
        return loss
    # -------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(3)]
    before = _params(model)
    bad = x.copy()
    bad[0, 0] = np.nan
    assert np.isnan(float(train_step(model, optimizer, bad, y)))
    for got, want in zip(_params(model), before):  # the skipped update never happened
        np.testing.assert_array_equal(got, want)
    stats = safeopt.check(optimizer)
    assert (stats["steps"], stats["skips"], stats["nonfinite"]) == (3, 1, 1)
    assert stats["last_loss"] == pytest.approx(losses[-1])
    assert stats["norm_clips"] == 3  # 16x4 tanh units: the first norms are above 1
    # nnx's own step counter counts every update call, skipped ones too; the inner
    # optimizer's count (what an Optax schedule reads) only the applied ones.
    assert int(optimizer.step[...]) == 4
    inner_counts = [int(leaf) for path, leaf in jax.tree.leaves_with_path(
        nnx.as_pure(optimizer.opt_state.inner)) if jax.tree_util.keystr(path).endswith("count")]
    assert inner_counts == [3]
    assert "1 skipped" in str(safeopt.diagnose(optimizer))
