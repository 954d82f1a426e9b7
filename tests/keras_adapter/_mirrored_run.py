"""Runs the MirroredStrategy checks in a fresh process (TensorFlow backend).

Two logical CPU devices must be configured before TensorFlow initialises,
so this runs as a subprocess of ``test_keras_distribute.py`` and prints its
results as one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

os.environ["KERAS_BACKEND"] = "tensorflow"

import tensorflow as tf

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402
import numpy as np  # noqa: E402

import safeopt  # noqa: E402

BATCH, N_BATCHES = 8, 6
_RECOVERY = ("recoveries", "last_recovery", "rolled_back", "steps", "skips")


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N_BATCHES * BATCH, 5)).astype(np.float32) * 3.0
    y = rng.normal(size=(N_BATCHES * BATCH, 1)).astype(np.float32) * 5.0
    return x, y


def _train(strategy: Any, make_opt: Any, x: np.ndarray, y: np.ndarray,
           ) -> tuple[list[np.ndarray], dict[str, Any], list[bool]]:
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        opt = make_opt()
        model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    same = [bool(all(np.array_equal(np.asarray(r), np.asarray(v.value.values[0]))
                     for r in v.value.values))
            for v in model.weights] if hasattr(model.weights[0].value, "values") else []
    stats = safeopt.stats(opt) if isinstance(opt, keras.optimizers.Optimizer) and hasattr(
        opt, "inner_optimizer") else {}
    stats.pop("names", None)
    return [np.asarray(w) for w in model.get_weights()], stats, same


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(p - q))) for p, q in zip(a, b))


def main() -> None:
    x, y = _data()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.get_strategy()
    policy = {"clip_norm": 0.2}

    def safe() -> Any:
        return safeopt.wrap(keras.optimizers.SGD(0.1), policy)

    def native() -> Any:
        return keras.optimizers.SGD(0.1, global_clipnorm=0.2)

    w_mirror, s_mirror, same_clip = _train(mirrored, safe, x, y)
    w_single, s_single, _ = _train(single, safe, x, y)
    # Keras's global_clipnorm on 1 device matches safeopt (test_clipping_matches_keras).
    w_native_mirror, _, _ = _train(mirrored, native, x, y)

    # NaN in replica 0's shard of batch 1 and in replica 1's shard of batch 4.
    x_bad = x.copy()
    x_bad[1 * BATCH + 0, 0] = math.nan
    x_bad[4 * BATCH + BATCH - 1, 2] = math.inf
    w_bad, s_bad, same_bad = _train(mirrored, safe, x_bad, y)
    keep = np.ones(len(x), bool)
    keep[1 * BATCH:2 * BATCH] = False
    keep[4 * BATCH:5 * BATCH] = False
    w_left_out, s_left_out, _ = _train(single, safe, x[keep], y[keep])

    # Recovery: NaN in replica 0's shard of batch 3, in replica 1's of batch 4: the streak
    # reaches max_consecutive_skips=2 at update 4, which restores the snapshot before update 2.
    def recovering() -> Any:
        return safeopt.wrap(keras.optimizers.SGD(0.1), {**policy, "recover": True,
                                                        "snapshot_every": 2,
                                                        "max_consecutive_skips": 2})

    x_streak = x.copy()
    x_streak[3 * BATCH + 0, 0] = math.nan
    x_streak[4 * BATCH + BATCH - 1, 1] = math.nan
    w_rec, s_rec, same_rec = _train(mirrored, recovering, x_streak, y)
    w_rec_single, s_rec_single, _ = _train(single, recovering, x_streak, y)

    print(json.dumps({
        "replicas": mirrored.num_replicas_in_sync,
        "safe_mirror_vs_single": _max_diff(w_mirror, w_single),
        "native_mirror_vs_single": _max_diff(w_native_mirror, w_single),
        "norm_clips_mirror": s_mirror["norm_clips"],
        "norm_clips_single": s_single["norm_clips"],
        "last_loss_mirror": s_mirror["last_loss"],
        "last_loss_single": s_single["last_loss"],
        "replicas_equal": same_clip + same_bad + same_rec,
        "nan_vs_left_out": _max_diff(w_bad, w_left_out),
        "nan_finite": all(bool(np.isfinite(w).all()) for w in w_bad),
        "nan_stats": {k: s_bad[k] for k in ("skips", "nonfinite", "steps")},
        "left_out_steps": s_left_out["steps"],
        "recover_vs_single": _max_diff(w_rec, w_rec_single),
        "recover_finite": all(bool(np.isfinite(w).all()) for w in w_rec),
        "recover_stats": {k: s_rec[k] for k in _RECOVERY},
        "recover_stats_single": {k: s_rec_single[k] for k in _RECOVERY},
    }))


if __name__ == "__main__":
    sys.exit(main())
