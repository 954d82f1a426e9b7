"""The conformance table: each case described once, with its expected outcome.

A case is a policy, parameters and a sequence of updates (gradients, a loss,
and parameters overwritten before the update, such as NaN weights), and
what must come out, worked out by hand: which updates are skipped, the
parameters after the last update under SGD with learning rate 1, counters,
the signs of the diagnosis, the telemetry ``clipped`` flags and where the
run diverges. Everything else observable is compared with the NumPy
reference by :func:`safeopt.testing.check`.

Two-dimensional arrays are written in the JAX/Keras kernel layout ``(in,
out)``; :meth:`Case.arrays` transposes them for torch's ``(out, in)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from safeopt._features.recovery import CAUSES

Arrays = tuple[Any, ...]
NAN, INF = math.nan, math.inf
#: What fired at a divergence, as ``stats()`` names it (``divergence_cause``).
STREAK, PATIENCE, WEIGHTS = (CAUSES[1], CAUSES[2], CAUSES[4])


@dataclasses.dataclass(frozen=True)
class Update:
    """One update of a case.

    Attributes:
      grads: One gradient per parameter tensor; ``None``: that tensor has no
        gradient this update (a torch ``.grad`` of ``None``, a ``None``
        Keras gradient, a leaf masked out of the wrapper in Optax).
      loss: The loss handed to the step, if any.
      weights: Parameters overwritten before the update (``{index: value}``).
    """

    grads: Arrays
    loss: float | None = None
    weights: Mapping[int, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case (see the module docstring).

    Attributes:
      name: Test id.
      policy: Anything :func:`safeopt.load_policy` accepts.
      params: The initial parameters, one nested list per tensor.
      updates: The updates, in order.
      skipped: Whether each update is skipped.
      final: The parameters after the last update.
      counters: Expected :func:`safeopt.stats` values after the last update.
      signs: Expected ``{sign letter: update index its episode began}``.
      clipped: Expected telemetry ``clipped`` flag after each update.
      diverges_at: The update at which :class:`safeopt.DivergenceError` is
        first raised.
    """

    name: str
    policy: Any
    params: Arrays
    updates: tuple[Update, ...]
    skipped: tuple[bool, ...] | None = None
    final: Arrays | None = None
    counters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    signs: Mapping[str, int] = dataclasses.field(default_factory=dict)
    clipped: tuple[bool, ...] | None = None
    diverges_at: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names: ``w0``, ``w1``, ..."""
        return tuple(f"w{i}" for i in range(len(self.params)))

    @property
    def needs(self) -> frozenset[str]:
        """What a runner must support.

        ``"no_grad"``: a tensor without a gradient on every update;
        ``"no_grad_sometimes"``: a tensor with a gradient on some updates
        only (JAX gradient trees have every leaf on every update);
        ``"weights"``: parameters overwritten between updates; ``"loss"``.
        """
        out = set()
        for i in range(len(self.params)):
            absent = [u.grads[i] is None for u in self.updates]
            if all(absent):
                out.add("no_grad")
            elif any(absent):
                out.add("no_grad_sometimes")
        for u in self.updates:
            if u.weights:
                out.add("weights")
            if u.loss is not None:
                out.add("loss")
        return frozenset(out)

    def arrays(self, which: str, layout: str = "in_out") -> list[np.ndarray]:
        """``params`` or ``final`` as float32 arrays (``"out_in"``: torch's layout)."""
        return [_layout(np.asarray(a, np.float32), layout) for a in getattr(self, which)]

    def grads(self, update: Update, layout: str = "in_out") -> list[np.ndarray | None]:
        """The update's gradients as float32 arrays (``None`` where absent)."""
        return [None if g is None else _layout(np.asarray(g, np.float32), layout)
                for g in update.grads]

    def set_weights(self, params: list[np.ndarray], update: Update,
                    layout: str = "in_out") -> list[np.ndarray]:
        """``params`` with the update's overwritten weights (new arrays)."""
        out = [p.copy() for p in params]
        for i, value in update.weights.items():
            out[i] = _layout(np.asarray(value, np.float32), layout)
            assert out[i].shape == params[i].shape, f"{self.name}: weights[{i}] shape"
        return out


def _layout(a: np.ndarray, layout: str) -> np.ndarray:
    return a.T.copy() if layout == "out_in" and a.ndim == 2 else a


def _one(name: str, policy: Any, params: Arrays, grads: Arrays, skip: bool = False,
         effective: Arrays | None = None, counters: Mapping[str, Any] | None = None,
         loss: float | None = None) -> Case:
    """A one-update case; ``effective`` is the gradient the inner optimizer must see."""
    final = params if skip or effective is None else tuple(
        (np.asarray(p, np.float64) - np.asarray(e, np.float64)).tolist()
        for p, e in zip(params, effective))
    return Case(name, policy, params, (Update(grads, loss),), skipped=(skip,), final=final,
                counters=dict(counters or {}))


_SMALL = Update(((0.1, 0.1), (0.1,)))
_R = 1.0 - 1.0 / math.sqrt(2.0)

#: The cases, described once.
CASES: tuple[Case, ...] = (
    # -- one update: each action on its own ------------------------------------------
    _one("global_norm_clipped", {"clip_norm": 1.0},
         ((0.0, 0.0), (0.0, 0.0)), ((3.0, 0.0), (0.0, 4.0)), effective=((0.6, 0.0), (0.0, 0.8)),
         counters={"norm_clips": 1, "skips": 0, "steps": 1}),
    _one("global_norm_below_threshold", {"clip_norm": 10.0},
         ((1.0, 1.0), (1.0,)), ((3.0, 0.0), (4.0,)), effective=((3.0, 0.0), (4.0,)),
         counters={"norm_clips": 0, "steps": 1}),
    _one("per_tensor_norm", {"clip_norm": 1.0, "norm_scope": "per_tensor"},
         ((0.0, 0.0), (0.0, 0.0)), ((3.0, 4.0), (0.3, 0.4)), effective=((0.6, 0.8), (0.3, 0.4)),
         counters={"norm_clips": 1}),
    _one("value_clip", {"clip_norm": None, "clip_value": 0.5},
         ((0.0, 0.0, 0.0),), ((1.0, -2.0, 0.25),), effective=((0.5, -0.5, 0.25),),
         counters={"value_clips": 1, "norm_clips": 0}),
    _one("value_clip_then_norm_clip", {"clip_norm": 0.5, "clip_value": 0.5},
         ((0.0, 0.0, 0.0, 0.0),), ((1.0, -1.0, 1.0, -1.0),),
         effective=((0.25, -0.25, 0.25, -0.25),), counters={"value_clips": 1, "norm_clips": 1}),
    _one("nan_skips", {"clip_norm": 1.0}, ((1.0, 2.0), (3.0,)), ((NAN, 0.0), (1.0,)), skip=True,
         counters={"skips": 1, "nonfinite": 1, "steps": 0, "norm_clips": 0}),
    _one("inf_skips", {"clip_norm": 1.0, "clip_value": 0.5}, ((1.0, 2.0), (3.0,)),
         ((0.0, 0.0), (-INF,)), skip=True, counters={"skips": 1, "nonfinite": 1,
                                                    "value_clips": 0}),
    _one("nan_loss_skips", {"clip_norm": 1.0}, ((1.0,),), ((0.5,),), loss=NAN, skip=True,
         counters={"skips": 1, "last_loss": None}),
    _one("nonfinite_applied_when_not_skipping", {"clip_norm": None, "skip_nonfinite": False},
         ((1.0, 2.0),), ((NAN, 1.0),), effective=((NAN, 1.0),),
         counters={"skips": 0, "nonfinite": 1, "steps": 1}),
    _one("l2_penalty", {"clip_norm": None, "l2": 0.5},
         ((1.0, 2.0),), ((0.1, 0.1),), effective=((1.1, 2.1),)),
    _one("l1_penalty", {"clip_norm": None, "l1": 0.1},
         ((1.0, -2.0, 0.5),), ((0.0, 0.0, 0.0),), effective=((0.1, -0.1, 0.1),)),
    _one("penalty_then_norm_clip", {"clip_norm": 1.0, "l2": 0.5},
         ((3.0, 4.0),), ((0.0, 0.0),), effective=((0.6, 0.8),), counters={"norm_clips": 1}),
    _one("unitwise_vector", {"clip_norm": 0.01, "norm_scope": "unitwise"},
         ((3.0, 4.0),), ((0.3, 0.4),), effective=((0.03, 0.04),), counters={"norm_clips": 1}),
    _one("unitwise_kernel", {"clip_norm": 0.01, "norm_scope": "unitwise"},
         (((1.0, 0.0), (0.0, 2.0)),), (((0.1, 0.0), (0.0, 0.1)),),
         effective=(((0.01, 0.0), (0.0, 0.02)),), counters={"norm_clips": 1}),
    _one("unitwise_below_threshold", {"clip_norm": 1.0, "norm_scope": "unitwise"},
         (((1.0, 0.0), (0.0, 2.0)),), (((0.1, 0.0), (0.0, 0.1)),),
         effective=(((0.1, 0.0), (0.0, 0.1)),), counters={"norm_clips": 0}),
    _one("off_passes_nan_through", "off", ((1.0, 2.0),), ((NAN, 100.0),),
         effective=((NAN, 100.0),)),
    _one("off_leaves_large_gradients", "off", ((1.0, 2.0),), ((300.0, -400.0),),
         effective=((300.0, -400.0),)),
    _one("loss_given", {"clip_norm": 1.0}, ((1.0,),), ((0.5,),), loss=2.5,
         effective=((0.5,),), counters={"last_loss": 2.5}),
    # -- a parameter without a gradient: no penalty, no share of the norm -------------
    _one("no_gradient_is_not_penalised", {"l2": 0.5, "clip_norm": 1.0},
         ((1.0, 1.0), (3.0, 3.0)), ((0.0, 0.0), None), effective=((1.0 - _R, 1.0 - _R),
                                                                  (0.0, 0.0)),
         counters={"norm_clips": 1, "steps": 1}),
    Case("no_gradient_over_updates", {"clip_norm": 1.0, "monitor_every": 1, "l1": 0.01},
         ((1.0, 1.0), (3.0,), (0.5,)),
         (Update(((3.0, 4.0), None, (0.0,))), Update(((0.0, 0.0), None, (2.0,))),
          Update(((0.3, 0.4), None, (0.0,)))),
         skipped=(False, False, False), counters={"norm_clips": 2, "steps": 3}),
    Case("gradient_on_some_updates", {"clip_norm": 1.0, "monitor_every": 1},
         ((1.0, 1.0), (0.5,)),
         (Update(((3.0, 4.0), (0.0,))), Update(((0.0, 0.0), (2.0,))),
          Update(((0.3, 0.4), None))),
         skipped=(False, False, False),
         final=((1.0 - 0.6 - 0.3, 1.0 - 0.8 - 0.4), (0.5 - 1.0,)),
         counters={"norm_clips": 2}),
    # -- NaN/Inf weights fire sign (c) at the monitor update that sees them ----------
    Case("nan_weights_on_a_monitor_update", {"clip_norm": 1.0, "monitor_every": 2},
         ((1.0, 1.0), (0.5,)),
         (_SMALL, _SMALL, Update(_SMALL.grads, weights={0: (NAN, 1.0)}), _SMALL, _SMALL),
         skipped=(False,) * 5, signs={"c": 2},
         counters={"steps": 5, "skips": 0}),
    Case("inf_weights_between_monitor_updates", {"clip_norm": 1.0, "monitor_every": 2},
         ((1.0, 1.0), (0.5,)),
         (_SMALL, _SMALL, _SMALL, Update(_SMALL.grads, weights={1: (INF,)}), _SMALL),
         skipped=(False,) * 5, signs={"c": 4}),
    # -- every norm scope reports its clips in telemetry --------------------------------
    Case("per_tensor_clips_are_recorded", {"clip_norm": 1.0, "norm_scope": "per_tensor"},
         ((0.0, 0.0), (0.0, 0.0)),
         (Update(((3.0, 4.0), (0.3, 0.4))), Update(((0.3, 0.4), (0.3, 0.4))),
          Update(((0.0, 0.0), (6.0, 8.0)))),
         clipped=(True, False, True), counters={"norm_clips": 2, "last_scale": 1.0},
         final=((-0.6 - 0.3, -0.8 - 0.4), (-0.3 - 0.3 - 0.6, -0.4 - 0.4 - 0.8))),
    Case("unitwise_clips_are_recorded", {"clip_norm": 0.01, "norm_scope": "unitwise"},
         (((1.0, 0.0), (0.0, 2.0)),),
         (Update((((0.1, 0.0), (0.0, 0.1)),)), Update((((0.0, 0.0), (0.0, 0.0)),)),
          Update((((0.1, 0.0), (0.0, 0.1)),))),
         clipped=(True, False, True), counters={"norm_clips": 2}),
    Case("global_clips_are_recorded", {"clip_norm": 1.0},
         ((0.0, 0.0),),
         (Update(((3.0, 4.0),)), Update(((0.3, 0.4),)), Update(((6.0, 8.0),))),
         clipped=(True, False, True), counters={"norm_clips": 2},
         final=((-0.6 - 0.3 - 0.6, -0.8 - 0.4 - 0.8),)),
    # -- spike skipping: a lasting level shift becomes the new baseline ---------------
    Case("loss_level_shift_does_not_lock",
         {"spike_skip": "loss", "spike_window": 8, "spike_warmup": 4, "spike_k": 3.0,
          "clip_norm": None, "monitor_every": 0},
         ((0.0,),),
         tuple(Update(((0.01,),), loss=v) for v in
               (1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0, *(5.0,) * 8)),
         skipped=(False,) * 8 + (True,) + (False,) * 7,
         counters={"spikes": 1, "skips": 1, "steps": 15, "last_loss": 5.0}),
    Case("grad_norm_spike_is_skipped",
         {"spike_skip": "grad_norm", "spike_window": 8, "spike_warmup": 4, "clip_norm": None},
         ((0.0,),),
         tuple(Update(((g,),)) for g in (1.0, 1.1, 0.9, 1.0, 1.05, 50.0, 1.0)),
         skipped=(False,) * 5 + (True, False), counters={"spikes": 1, "nonfinite": 0}),
    # -- the monitor's cadence counts every update, applied or skipped ---------------
    Case("monitor_every_3", {"clip_norm": None, "monitor_every": 3},
         ((3.0, 4.0),), tuple(Update(((1.0, 0.0),)) for _ in range(5)),
         final=((-2.0, 4.0),), counters={"last_weight_norm": 4.0}),
    Case("monitor_cadence_counts_skipped_updates", {"clip_norm": None, "monitor_every": 2},
         ((3.0, 4.0),),
         (Update(((1.0, 0.0),)), Update(((NAN, 0.0),)), Update(((1.0, 0.0),)),
          Update(((1.0, 0.0),))),
         skipped=(False, True, False, False), final=((0.0, 4.0),),
         counters={"last_weight_norm": math.sqrt(2.0 ** 2 + 4.0 ** 2)}),
    # -- adaptive thresholds and the adaptive penalty ---------------------------------
    Case("zscore_threshold", {"adaptive": "zscore", "warmup": 2, "clip_norm": 10.0},
         ((0.0,),), tuple(Update(((g,),)) for g in (1.0, 1.2, 1.1, 9.0, NAN, 1.0)),
         skipped=(False,) * 4 + (True, False), counters={"norm_clips": 1}),
    Case("percentile_threshold", {"adaptive": "percentile", "warmup": 2, "history": 4,
                                  "percentile": 50.0, "clip_norm": 10.0},
         ((0.0,),), tuple(Update(((g,),)) for g in (1.0, 2.0, 4.0, INF, 3.0, 1.0)),
         skipped=(False,) * 3 + (True, False, False), counters={"norm_clips": 2},
         final=(-(1.0 + 2.0 + 2.0 + 2.5 + 1.0),)),
    Case("penalty_while_weights_above", {"clip_norm": None, "l2": 0.5,
                                         "penalty_when": "weights_above",
                                         "weight_norm_max": 2.0},
         ((3.0,),), (Update(((0.0,),)), Update(((0.0,),)), Update(((0.0,),))),
         final=((3.0 - 3.0 - 0.0 - 0.0,),)),
    # -- the loss monitor and the divergence check ---------------------------------------
    Case("unstable_loss", {"clip_norm": 1.0, "monitor_window": 4},
         ((0.0, 0.0),),
         tuple(Update(((0.1, 0.1),), loss=v) for v in
               (1.0, 1.01, 1.0, 1.01, 1.0, 9.0, 0.5, 7.0, 0.3, 8.0)),
         skipped=(False,) * 10),
    # -- recovery: restore the last good snapshot, back the learning rate off -----------
    Case("nan_streak_recovers", {"recover": True, "snapshot_every": 2, "clip_norm": None,
                                 "max_consecutive_skips": 3, "recover_warmup": 4},
         ((1.0,),),
         (*(Update(((0.5,),)) for _ in range(3)), *(Update(((NAN,),)) for _ in range(3)),
          Update(((0.5,),)), Update(((0.5,),))),
         skipped=(False,) * 3 + (True,) * 3 + (False, False),
         # the snapshot before update 2 holds 0.0; then lr x0.325 and x0.55 (warm-up of 4)
         final=((0.0 - 0.325 * 0.5 - 0.55 * 0.5,),),
         counters={"recoveries": 1, "rolled_back": 3, "skips": 3, "consecutive_skips": 0,
                   "last_recovery": {"at": 5, "restored_to": 2, "cause": [STREAK]}}),
    Case("poisoned_weight_recovers", {"recover": True, "snapshot_every": 2, "clip_norm": None,
                                      "monitor_every": 1},
         ((1.0, 1.0),),
         (Update(((0.1, 0.1),)), Update(((0.1, 0.1),)), Update(((0.1, 0.1),)),
          Update(((0.1, 0.1),), weights={0: (NAN, 1.0)}), Update(((0.1, 0.1),))),
         skipped=(False, False, False, True, False),
         counters={"recoveries": 1, "divergence_cause": [WEIGHTS],
                   "last_recovery": {"at": 3, "restored_to": 2, "cause": [WEIGHTS]}},
         signs={"c": 3}),
    Case("loss_spike_run_recovers", {"recover": True, "snapshot_every": 2, "clip_norm": None,
                                     "spike_warmup": 3, "spike_window": 8,
                                     "recover_patience": 2},
         ((0.0,),),
         tuple(Update(((0.1,),), loss=v) for v in (1.0, 1.1, 0.9, 1.0, 50.0, 60.0, 1.0)),
         skipped=(False,) * 5 + (True, False),
         final=((-0.2 - 0.109 * 0.1,),),  # back to the snapshot before update 2, lr x0.109
         counters={"recoveries": 1, "rolled_back": 3,
                   "last_recovery": {"at": 5, "restored_to": 2, "cause": [PATIENCE]}}),
    Case("recoveries_run_out", {"recover": True, "snapshot_every": 1, "clip_norm": None,
                                "max_consecutive_skips": 2, "max_recoveries": 1},
         ((1.0,),),
         (Update(((0.5,),)), Update(((NAN,),)), Update(((NAN,),)), Update(((0.5,),)),
          Update(((NAN,),)), Update(((NAN,),))),
         skipped=(False, True, True, False, True, True), diverges_at=5,
         counters={"recoveries": 1, "recovery_exhausted": True, "divergence_cause": [STREAK]}),
    Case("nan_streak_diverges", {"clip_norm": 1.0, "max_consecutive_skips": 3},
         ((1.0,),), (Update(((0.5,),)), *(Update(((NAN,),)) for _ in range(4))),
         skipped=(False, True, True, True, True), diverges_at=3, final=((0.5,),),
         counters={"consecutive_skips": 4, "streak_nonfinite": 4}),
)
