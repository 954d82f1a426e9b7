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

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

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
from safeopt._remedies import Remedy, remedies_for
from safeopt._state import State

_LETTERS = dict(zip(SIGNS, "abcde"))
_TITLES = {
    "nonfinite": "loss or gradients went NaN/Inf",
    "loss_unstable": "unstable loss: large changes from update to update",
    "weight_growth": "weights growing fast or going NaN/Inf",
    "layer_norms": "per-layer gradient norms consistently above 1.0",
    "no_traction": "the loss is not getting traction",
}


@dataclasses.dataclass(frozen=True)
class Sign:
    """One sign of exploding gradients, as the monitor saw it.

    Attributes:
      key: The sign's name in :data:`safeopt._decide.SIGNS`.
      letter: Its letter in the issue's list, ``"a"`` to ``"e"``.
      title: What the sign means, in words.
      since: Update index (applied or skipped, 0-based) at which its latest
        episode began.
      last: Update index at which it last fired.
      count: Number of updates on which it fired.
      active: Whether it fired within the last ``monitor_window`` updates.
      evidence: The numbers behind it, in words.
      data: The same numbers, machine-readable.
    """

    key: str
    letter: str
    title: str
    since: int
    last: int
    count: int
    active: bool
    evidence: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A parameter tensor whose gradient norm stays above 1.0.

    Attributes:
      name: Parameter name (framework path), or ``param{i}`` without names.
      index: Position of the tensor in parameter order.
      norm: EMA of its raw gradient norm.
      over_fraction: EMA of the fraction of steps with a norm above 1.0.
      since: Update index since which the fraction stays above one half.
    """

    name: str
    index: int
    norm: float
    over_fraction: float
    since: int


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What the monitor says about a run: signs, hot layers, remedies.

    ``str(diagnosis)`` reads as a short report.

    Attributes:
      updates: Updates seen (applied + skipped).
      applied: Updates applied.
      skipped: Updates skipped.
      signs: Every sign that fired during the run, in the order (a) to (e).
      layers: Layers whose gradient norm stays above 1.0, largest first.
      remedies: What to try, in the order a practitioner would try it.
      window: The policy's ``monitor_window``.
    """

    updates: int
    applied: int
    skipped: int
    signs: tuple[Sign, ...] = ()
    layers: tuple[Layer, ...] = ()
    remedies: tuple[Remedy, ...] = ()
    window: int = 50

    @property
    def active(self) -> tuple[Sign, ...]:
        """The signs that fired within the last ``monitor_window`` updates."""
        return tuple(s for s in self.signs if s.active)

    @property
    def exploding(self) -> bool:
        """Whether any sign is active now."""
        return bool(self.active)

    def fired(self, sign: str) -> bool:
        """Whether ``sign`` (a key such as ``"nonfinite"`` or a letter) ever fired."""
        return any(sign in (s.key, s.letter) for s in self.signs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (see :meth:`from_dict`)."""
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        """Rebuilds a diagnosis from :meth:`to_dict`'s output."""
        return cls(
            updates=int(data["updates"]), applied=int(data["applied"]),
            skipped=int(data["skipped"]),
            signs=tuple(Sign(**s) for s in data.get("signs", ())),
            layers=tuple(Layer(**la) for la in data.get("layers", ())),
            remedies=tuple(Remedy(**r) for r in data.get("remedies", ())),
            window=int(data.get("window", 50)),
        )

    def __str__(self) -> str:
        return "\n".join(_lines(self))


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


# ---------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------
def _lines(d: Diagnosis) -> list[str]:
    head = (f"safeopt diagnosis after {d.updates} updates ({d.applied} applied, "
            f"{d.skipped} skipped): ")
    if not d.signs:
        return [head + "no sign of exploding gradients."]
    verdict = "exploding gradients likely." if d.exploding else \
        f"no sign in the last {d.window} updates; earlier signs below."
    lines = [head + verdict, "", "Signs:"]
    for s in d.signs:
        when = f"since update {s.since}" if s.active else f"updates {s.since}-{s.last}"
        state = "" if s.active else " (not active now)"
        lines.append(f"  ({s.letter}) {s.title}{state}: {when}, {s.count} update(s).")
        lines.append(f"      {s.evidence.rstrip('.')}.")
    if d.layers:
        lines += ["", "Layers whose gradient norm stays above 1.0:"]
        width = max(len(la.name) for la in d.layers)
        for la in d.layers:
            lines.append(f"  {la.name:<{width}}  norm ~{la.norm:.3g}, above 1.0 on "
                         f"{la.over_fraction:.0%} of recent steps, since update {la.since}")
    if d.remedies:
        lines += ["", "Remedies, in the order to try them:"]
        lines += [f"  {k}. {r.text}" for k, r in enumerate(d.remedies, 1)]
    return lines


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
