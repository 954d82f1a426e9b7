"""Reading state saved by safeopt 0.1, whose state was one flat tuple of 35 fields.

:func:`upgrade` maps such a state (``{field: array}``) onto the per-feature
keys of :func:`safeopt._state.flatten`, so that checkpoints written by 0.1
(a torch state dict, a Keras ``.keras`` file, an Optax state) still load.
Fields 0.1 did not have are derived where they can be and otherwise start
fresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: Fields of the 0.1 state, in its order (what its checkpoints hold).
FIELDS_0_1 = (
    "steps", "skips", "consecutive_skips", "nonfinite", "spikes", "norm_clips", "value_clips",
    "last_norm", "last_scale", "threshold", "last_loss", "last_weight_norm", "ema_mean",
    "ema_var", "norm_history", "spike_history", "spike_count", "layer_norm_ema",
    "layer_over_frac", "layer_over_since", "sign_since", "sign_last", "sign_count",
    "first_nonfinite_step", "weight_nonfinite_step", "loss_deltas", "loss_count",
    "loss_outlier_frac", "loss_ema", "loss_first", "loss_best", "loss_best_step", "wnorm_last",
    "wnorm_last_step", "wnorm_rate",
)

_SAME = {
    "counters": ("steps", "skips", "consecutive_skips", "nonfinite", "spikes", "norm_clips",
                 "value_clips", "last_norm", "last_scale", "threshold", "last_loss",
                 "last_weight_norm", "first_nonfinite_step", "weight_nonfinite_step"),
    "monitor": ("layer_norm_ema", "layer_over_frac", "layer_over_since", "sign_since",
                "sign_last", "sign_count", "loss_deltas", "loss_count", "loss_outlier_frac",
                "loss_ema", "loss_first", "loss_best", "loss_best_step", "wnorm_last",
                "wnorm_last_step", "wnorm_rate"),
}
_RENAMED = {
    "adaptive.mean": "ema_mean", "adaptive.var": "ema_var", "adaptive.history": "norm_history",
    "adaptive.count": "steps", "spike.history": "spike_history", "spike.count": "spike_count",
    "penalty.last_weight_norm": "last_weight_norm",
}


def is_legacy(flat: Mapping[str, Any]) -> bool:
    """Whether ``flat`` is a 0.1 state (plain field names, no ``"feature."`` prefix)."""
    return "steps" in flat and "counters.steps" not in flat


def upgrade(old: Mapping[str, Any]) -> dict[str, Any]:
    """A 0.1 state as ``{"feature.field": array}`` (the keys :func:`flatten` makes).

    Keys of features the new policy does not use are ignored by
    :func:`safeopt._state.unflatten`, as are buffers whose size differs.
    """
    host = {name: np.asarray(value) for name, value in old.items()}
    out: dict[str, Any] = {}
    for feature, names in _SAME.items():
        for name in names:
            if name in host:
                out[f"{feature}.{name}"] = host[name]
    for key, name in _RENAMED.items():
        if name in host:
            out[key] = host[name]
    steps = host["steps"].astype(np.int32)
    streak = host.get("consecutive_skips", np.int32(0)).astype(np.int32)
    out["counters.streak_nonfinite"] = streak  # 0.1 blamed NaN/Inf for every streak
    loss = host.get("last_loss", np.float32(np.nan))
    out["counters.loss_updates"] = np.int32(steps if np.isfinite(loss) else 0)
    out["counters.last_clipped"] = np.int32(host.get("last_scale", 1.0) < 1.0)
    if "layer_norm_ema" in host:
        out["monitor.layer_count"] = np.full(host["layer_norm_ema"].shape, steps, np.int32)
    # 0.1's sign (d) was "layer norms above 1.0"; today's (d) is a gradient norm
    # grown tenfold, which 0.1 did not track: that sign starts afresh.
    for name, fresh in (("sign_since", -1), ("sign_last", -1), ("sign_count", 0)):
        if f"monitor.{name}" in out and np.shape(out[f"monitor.{name}"]) == (5,):
            out[f"monitor.{name}"] = np.asarray(out[f"monitor.{name}"]).copy()
            out[f"monitor.{name}"][3] = fresh
    return out
