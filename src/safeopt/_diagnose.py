"""Diagnosis of exploding gradients from the statistics kept on the device.

Every update, the monitor (:mod:`safeopt._features.monitor`) updates,
branch-free and on the device, the statistics behind five signs of exploding
gradients (see :data:`~safeopt._features.monitor.SIGNS`):

* (a) ``nonfinite``: the loss or the gradients went NaN/Inf;
* (b) ``loss_unstable``: large changes of the loss from update to update
  (a robust z-score of each change against the last ``monitor_window``
  changes, and the fraction of outliers over that window), or a diverging
  loss (the smoothed loss gave back half of its progress, or doubled);
* (c) ``weight_growth``: the weight norm grows fast (relative growth per step,
  averaged over ``monitor_window`` steps, above doubling per window) or went
  NaN/Inf;
* (d) ``grad_growth``: the gradient norm (an EMA over ``monitor_window / 5``
  updates) grew tenfold over its lowest level (the lowest mean over
  ``monitor_window`` updates) and is above 1.0;
* (e) ``no_traction``: the smoothed loss has not improved in
  ``monitor_window`` steps and has not even halved since the start.

:func:`diagnose` reads them once (a host synchronisation) and returns a
:class:`Diagnosis` whose verdict weighs them (see
:func:`safeopt._diagnosis.weigh`): *exploding* on conclusive evidence (NaN/Inf
loss, gradients or weights; or a growing gradient norm together with an
unstable loss or growing weights), with the remedies that fit, in the order
a practitioner would try them; *signs seen* when some sign fired without
being conclusive (no remedies: nothing to change yet); *healthy* otherwise.
It also names the layers whose gradient norm grew most.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063
  Brownlee (2017), A Gentle Introduction to Exploding Gradients in Neural
  Networks (the signs and the remedies, in this order).
  Iglewicz & Hoaglin (1993), How to Detect and Handle Outliers (the
  modified z-score, 0.6745 (x - median) / MAD, outlier above 3.5).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from safeopt._diagnosis import Diagnosis, Layer, Sign, nth, number, weigh
from safeopt._features.base import Empty
from safeopt._features.monitor import GRAD_FLOOR, GRAD_GROWTH, SIGNS
from safeopt._features.monitor_loss import (
    LOSS_OUTLIER_FRAC,
    LOSS_PROGRESS,
    LOSS_Z,
    TRACTION_FRACTION,
)
from safeopt._policy import Policy
from safeopt._recovered import recovery_summary
from safeopt._registry import read_state
from safeopt._remedies import remedies_for
from safeopt._state import State

_LETTERS = dict(zip(SIGNS, "abcde"))
_TITLES = {
    "nonfinite": "loss or gradients went NaN/Inf",
    "loss_unstable": "unstable loss: large changes from update to update, or diverging",
    "weight_growth": "weights growing fast or going NaN/Inf",
    "grad_growth": f"gradient norm grew x{GRAD_GROWTH:g} over its lowest level "
                   f"(and above {GRAD_FLOOR:g})",
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
      safeopt diagnosis after 0 updates (0 applied, 0 skipped): healthy, no sign of ...
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
      The :class:`Diagnosis`; remedies only when its verdict is ``"exploding"``.

    Example:
      >>> import safeopt, safeopt.adapter as sa
      >>> policy = safeopt.Policy()
      >>> state = sa.init_state(sa.namespace_by_name("numpy"), policy, n_tensors=1)
      >>> d = sa.diagnose_state(policy, state, ["w"])
      >>> d.signs, d.verdict
      ((), 'healthy')
    """
    st = _HostState(state)
    updates = st.int("steps") + st.int("skips")
    rec = recovery_summary(state)
    base = Diagnosis(updates=updates, applied=st.int("steps"), skipped=st.int("skips"),
                     window=policy.monitor_window, clipped=st.int("norm_clips"),
                     threshold=st.float("threshold"), recoveries=rec.get("recoveries", 0),
                     rolled_back=rec.get("rolled_back", 0),
                     last_recovery=rec.get("last_recovery"),
                     recovery_exhausted=rec.get("recovery_exhausted", False))
    if not st.monitored:
        return base
    names = layer_names(names, st.array("layer_norm_ema").shape[0])
    signs = tuple(s for s in (_sign(policy, st, key, updates, names) for key in SIGNS)
                  if s is not None)
    layers = _grown_layers(st, names) if any(s.key == "grad_growth" for s in signs) else ()
    exploding = weigh(signs, policy.monitor_window)[0] == "exploding"
    remedies = tuple(remedies_for(policy, signs, names)) if exploding else ()
    return dataclasses.replace(
        base, signs=signs, layers=layers, remedies=remedies,
        grad_norm=st.float("grad_mean") if st.int("grad_count") else math.nan)


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


def _grown_layers(st: _HostState, names: list[str]) -> tuple[Layer, ...]:
    """The layers whose gradient norm grew most (above 1.0), largest growth first.

    Those that grew :data:`GRAD_GROWTH` times over their lowest level; when
    the growth is spread so that none did alone, the three that grew most.
    """
    ema = st.array("layer_norm_ema").astype(np.float64)
    low = st.array("layer_norm_low").astype(np.float64)
    with np.errstate(all="ignore"):
        growth = np.where(np.isfinite(low) & (low > 0), ema / low, np.nan)
    candidates = [i for i in range(ema.shape[0])
                  if np.isfinite(growth[i]) and ema[i] > GRAD_FLOOR]
    candidates.sort(key=lambda i: -float(growth[i]))
    grown = [i for i in candidates if growth[i] >= GRAD_GROWTH] or candidates[:3]
    frac = st.array("layer_over_frac")
    since = st.array("layer_over_since")
    return tuple(Layer(names[i], i, float(ema[i]), float(frac[i]), int(since[i]),
                       float(growth[i])) for i in grown)


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
    text = f"{n} update(s) carried NaN/Inf gradients or loss, the first at update {nth(first)}"
    text += "; they were skipped" if policy.skip_nonfinite else "; skip_nonfinite is off"
    return text, {"nonfinite": n, "first_nonfinite_step": first,
                  "consecutive_skips": st.int("consecutive_skips")}


def _evidence_loss(policy: Policy, st: _HostState,
                   names: list[str]) -> tuple[str, dict[str, Any]]:
    frac = st.float("loss_outlier_frac")
    n = min(st.int("loss_count"), policy.monitor_window)
    deltas = st.array("loss_deltas")[:n]
    spread = float(np.median(np.abs(deltas - np.median(deltas)))) if n else math.nan
    best, first, peak = st.float("loss_best"), st.float("loss_first"), st.float("loss_peak")
    parts = []
    if frac > LOSS_OUTLIER_FRAC:
        parts.append(f"{frac:.0%} of recent loss changes are outliers (robust z above "
                     f"{LOSS_Z}, window {policy.monitor_window}); typical change "
                     f"{number(spread)}")
    if peak > best + 0.5 * abs(first - best) + abs(best):
        parts.append(f"the smoothed loss rose to {number(peak, '.4g')} after its best "
                     f"{number(best, '.4g')} (first {number(first, '.4g')})")
    text = "; ".join(parts) or (f"the loss was unstable or diverging earlier in the run "
                                f"(typical change now {number(spread)})")
    return text, {"outlier_fraction": frac, "mad": spread, "threshold": LOSS_OUTLIER_FRAC,
                  "best": best, "first": first, "peak": peak}


def _evidence_weights(policy: Policy, st: _HostState,
                      names: list[str]) -> tuple[str, dict[str, Any]]:
    rate = st.float("wnorm_rate")
    bad = st.int("weight_nonfinite_step")
    last = st.float("wnorm_last")
    parts = []
    if math.isfinite(rate) and rate > 0:
        speed = f"{rate:.2%}" if rate < 1.0 else f"{rate:.3g} times its size"
        parts.append(f"the weight norm grows by {speed} per update (a mean over "
                     f"{policy.monitor_window} updates; above {1 / policy.monitor_window:.0%} "
                     f"fires the sign), last seen at {number(last, '.4g')}")
    if bad >= 0:
        parts.append(f"the weight norm went NaN/Inf at update {nth(bad)}")
    text = "; ".join(parts) or "the weight norm grew fast earlier in the run"
    return text, {"growth_per_step": rate, "weight_norm": last, "weight_nonfinite_step": bad}


def _evidence_grad(policy: Policy, st: _HostState,
                   names: list[str]) -> tuple[str, dict[str, Any]]:
    peak, low, now = st.float("grad_peak"), st.float("grad_low"), st.float("last_norm")
    growth = peak / low if low > 0 else math.inf
    grown = _grown_layers(st, names)
    text = (f"the gradient norm reached {number(peak)}, x{number(growth)} its lowest level "
            f"({number(low)}, a mean over {policy.monitor_window} updates); the latest is "
            f"{number(now)}")
    if grown:
        text += ("; grew most in " + ", ".join(la.name for la in grown[:3])
                 + (f" and {len(grown) - 3} more" if len(grown) > 3 else ""))
    return text, {"growth": growth, "peak": peak, "lowest": low, "norm": now,
                  "layers": [la.name for la in grown]}


def _evidence_traction(policy: Policy, st: _HostState,
                       names: list[str]) -> tuple[str, dict[str, Any]]:
    best = st.float("loss_best")
    first = st.float("loss_first")
    best_step = st.int("loss_best_step")
    text = (f"the smoothed loss last improved by {LOSS_PROGRESS:.0%} at update {nth(best_step)} "
            f"(best {number(best, '.4g')}, first {number(first, '.4g')}: not below "
            f"{TRACTION_FRACTION:.0%} of it)")
    return text, {"best": best, "first": first, "best_step": best_step}


_EVIDENCE = {
    "nonfinite": _evidence_nonfinite,
    "loss_unstable": _evidence_loss,
    "weight_growth": _evidence_weights,
    "grad_growth": _evidence_grad,
    "no_traction": _evidence_traction,
}
