"""Diagnosis of exploding gradients from the statistics kept on the device.

Every update, the monitor (:mod:`safeopt._features.monitor`) updates,
branch-free and on the device, the statistics behind five signs of exploding
gradients (see :data:`~safeopt._features.monitor.SIGNS`):

* (a) ``nonfinite``: the loss or the gradients went NaN/Inf;
* (b) ``loss_unstable``: large changes of the loss from update to update
  (a robust z-score of each change against the last ``monitor_window``
  changes, and the fraction of outliers over that window);
* (c) ``weight_growth``: the weight norm grows fast (relative growth per step,
  averaged over ``monitor_window`` steps, above doubling per window) or went
  NaN/Inf;
* (d) ``layer_norms``: per-layer gradient norms stay above 1.0 (on more than
  half of the steps of a ``monitor_window`` EMA);
* (e) ``no_traction``: the smoothed loss has not improved in
  ``monitor_window`` steps and has not even halved since the start.

:func:`diagnose` reads them once (a host synchronisation) and returns a
:class:`Diagnosis`: the signs that fired and since which update, the layers
(by parameter name) whose gradient norm stays above 1.0, and the remedies
that fit, in the order a practitioner would try them.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063
  Brownlee (2017), A Gentle Introduction to Exploding Gradients in Neural
  Networks (the signs and the remedies, in this order).
  Iglewicz & Hoaglin (1993), How to Detect and Handle Outliers (the
  modified z-score, 0.6745 (x - median) / MAD, outlier above 3.5).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from safeopt._diagnosis import Diagnosis, Layer, Sign
from safeopt._features.base import Empty
from safeopt._features.monitor import LAYER_OVER_FRAC, SIGNS
from safeopt._features.monitor_loss import (
    LOSS_OUTLIER_FRAC,
    LOSS_PROGRESS,
    LOSS_Z,
    TRACTION_FRACTION,
)
from safeopt._policy import Policy
from safeopt._registry import read_state
from safeopt._remedies import remedies_for
from safeopt._state import State

_LETTERS = dict(zip(SIGNS, "abcde"))
_TITLES = {
    "nonfinite": "loss or gradients went NaN/Inf",
    "loss_unstable": "unstable loss: large changes from update to update",
    "weight_growth": "weights growing fast or going NaN/Inf",
    "layer_norms": "per-layer gradient norms consistently above 1.0",
    "no_traction": "the loss is not getting traction",
}


# ---------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------
def diagnose(obj: Any) -> Diagnosis:
    """Diagnoses a run from a wrapped optimizer (or a wrapped Optax state).

    Reads safeopt's state once (a host synchronisation) through the adapter.

    Args:
      obj: What :func:`safeopt.wrap` returned (torch, Keras) or the state of
        a wrapped Optax transformation.

    Returns:
      The :class:`Diagnosis`.

    Example:
      >>> import safeopt, torch  # doctest: +SKIP
      >>> opt = safeopt.wrap(torch.optim.SGD(model.parameters(), lr=0.1))  # doctest: +SKIP
      >>> print(safeopt.diagnose(opt))  # doctest: +SKIP
      safeopt diagnosis after 0 updates (0 applied, 0 skipped): no sign of exploding gradients.
    """
    policy, state, extra = read_state(obj)
    return diagnose_state(policy, state, extra.get("names"))


def diagnose_state(policy: Policy, state: State,
                   names: Sequence[str] | None = None) -> Diagnosis:
    """Diagnoses a run from a host copy of its state (pure; NumPy arrays or numbers).

    Args:
      policy: The policy the run used.
      state: The :class:`~safeopt._state.State`, fields convertible by ``numpy.asarray``.
      names: Parameter names in tensor order; ``param{i}`` when missing.

    Returns:
      The :class:`Diagnosis`.

    Example:
      >>> import safeopt, safeopt.adapter as sa
      >>> policy = safeopt.Policy()
      >>> state = sa.init_state(sa.namespace_by_name("numpy"), policy, n_tensors=1)
      >>> sa.diagnose_state(policy, state, ["w"]).signs
      ()
    """
    st = _HostState(state)
    updates = st.int("steps") + st.int("skips")
    if not st.monitored:
        return Diagnosis(updates=updates, applied=st.int("steps"), skipped=st.int("skips"),
                         window=policy.monitor_window)
    names = layer_names(names, st.array("layer_norm_ema").shape[0])
    signs = tuple(s for s in (_sign(policy, st, key, updates, names) for key in SIGNS)
                  if s is not None)
    layers = _hot_layers(st, names)
    return Diagnosis(
        updates=updates, applied=st.int("steps"), skipped=st.int("skips"), signs=signs,
        layers=layers, remedies=tuple(remedies_for(policy, signs, names)),
        window=policy.monitor_window,
    )


# ---------------------------------------------------------------------------
# Reading the state.
# ---------------------------------------------------------------------------
class _HostState:
    """Reads the counters' and the monitor's fields by name."""

    def __init__(self, state: State) -> None:
        self._counters = state.counters
        self._monitor = state.monitor
        self.monitored = not isinstance(state.monitor, Empty)

    def array(self, name: str) -> np.ndarray:
        part = self._counters if name in self._counters._fields else self._monitor
        return np.asarray(getattr(part, name))

    def int(self, name: str) -> int:
        return int(self.array(name))

    def float(self, name: str) -> float:
        return float(self.array(name))


def layer_names(names: Sequence[str] | None, n: int) -> list[str]:
    """Readable parameter names for ``n`` tensors (``param{i}`` when unknown).

    JAX key paths read as folders: ``"['dense00']['kernel']"`` becomes
    ``"dense00/kernel"``, ``".layers[0].weight"`` becomes ``"layers/0/weight"``.
    """
    if names is None or len(names) != n:
        return [f"param{i}" for i in range(n)]
    return [_readable(str(x)) for x in names]


def _readable(name: str) -> str:
    if not name or name[0] not in "[.":
        return name
    parts = re.findall(r"\['([^']*)'\]|\[\"([^\"]*)\"\]|\[(\d+)\]|\.(\w+)", name)
    words = ["".join(p) for p in parts]
    return "/".join(words) if words else name


def _hot_layers(st: _HostState, names: list[str]) -> tuple[Layer, ...]:
    frac = st.array("layer_over_frac")
    ema = st.array("layer_norm_ema")
    since = st.array("layer_over_since")
    hot = [i for i in range(frac.shape[0]) if frac[i] > LAYER_OVER_FRAC and since[i] >= 0]
    hot.sort(key=lambda i: -float(ema[i]))
    return tuple(Layer(names[i], i, float(ema[i]), float(frac[i]), int(since[i])) for i in hot)


def _sign(policy: Policy, st: _HostState, key: str, updates: int,
          names: list[str]) -> Sign | None:
    i = SIGNS.index(key)
    count = int(st.array("sign_count")[i])
    if count == 0:
        return None
    last = int(st.array("sign_last")[i])
    evidence, data = _EVIDENCE[key](policy, st, names)
    return Sign(
        key=key, letter=_LETTERS[key], title=_TITLES[key],
        since=int(st.array("sign_since")[i]), last=last, count=count,
        active=updates - 1 - last < policy.monitor_window, evidence=evidence, data=data,
    )


def _evidence_nonfinite(policy: Policy, st: _HostState,
                        names: list[str]) -> tuple[str, dict[str, Any]]:
    first = st.int("first_nonfinite_step")
    n = st.int("nonfinite")
    text = f"{n} update(s) carried NaN/Inf gradients or loss, the first at update {first}"
    text += "; they were skipped" if policy.skip_nonfinite else "; skip_nonfinite is off"
    return text, {"nonfinite": n, "first_nonfinite_step": first,
                  "consecutive_skips": st.int("consecutive_skips")}


def _evidence_loss(policy: Policy, st: _HostState,
                   names: list[str]) -> tuple[str, dict[str, Any]]:
    frac = st.float("loss_outlier_frac")
    n = min(st.int("loss_count"), policy.monitor_window)
    deltas = st.array("loss_deltas")[:n]
    spread = float(np.median(np.abs(deltas - np.median(deltas)))) if n else math.nan
    text = (f"{frac:.0%} of recent loss changes are outliers (robust z above {LOSS_Z}, "
            f"window {policy.monitor_window}); typical change {spread:.3g}")
    return text, {"outlier_fraction": frac, "mad": spread, "threshold": LOSS_OUTLIER_FRAC}


def _evidence_weights(policy: Policy, st: _HostState,
                      names: list[str]) -> tuple[str, dict[str, Any]]:
    rate = st.float("wnorm_rate")
    bad = st.int("weight_nonfinite_step")
    last = st.float("wnorm_last")
    parts = []
    if math.isfinite(rate) and rate > 0:
        per_window = math.exp(min(policy.monitor_window * math.log1p(rate), 700.0))
        speed = f"x{1.0 + rate:.3g}" if rate >= 1.0 else f"{rate:.2%}"
        parts.append(f"the weight norm grows {speed} per step (x{per_window:.3g} per "
                     f"{policy.monitor_window} steps), last seen at {last:.4g}")
    if bad >= 0:
        parts.append(f"the weight norm went NaN/Inf at update {bad}")
    text = "; ".join(parts) or "the weight norm grew fast earlier in the run"
    return text, {"growth_per_step": rate, "weight_norm": last, "weight_nonfinite_step": bad}


def _evidence_layers(policy: Policy, st: _HostState,
                     names: list[str]) -> tuple[str, dict[str, Any]]:
    hot = _hot_layers(st, names)
    frac = st.array("layer_over_frac")
    if hot:
        text = (f"{len(hot)} of {frac.shape[0]} layers have a gradient norm above 1.0 on more "
                f"than {LAYER_OVER_FRAC:.0%} of recent steps: "
                + ", ".join(la.name for la in hot[:5])
                + (f" and {len(hot) - 5} more" if len(hot) > 5 else ""))
    else:
        text = "layer gradient norms stayed above 1.0 earlier in the run"
    return text, {"layers": [la.name for la in hot]}


def _evidence_traction(policy: Policy, st: _HostState,
                       names: list[str]) -> tuple[str, dict[str, Any]]:
    best = st.float("loss_best")
    first = st.float("loss_first")
    best_step = st.int("loss_best_step")
    text = (f"the smoothed loss last improved by {LOSS_PROGRESS:.0%} at update {best_step} "
            f"(best {best:.4g}, first {first:.4g}: not below {TRACTION_FRACTION:.0%} of it)")
    return text, {"best": best, "first": first, "best_step": best_step}


_EVIDENCE = {
    "nonfinite": _evidence_nonfinite,
    "loss_unstable": _evidence_loss,
    "weight_growth": _evidence_weights,
    "layer_norms": _evidence_layers,
    "no_traction": _evidence_traction,
}
