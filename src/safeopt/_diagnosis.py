"""What a diagnosis says: the signs that fired, its verdict, the layers, the remedies.

:mod:`safeopt._diagnose` builds a :class:`Diagnosis` from the monitor's
statistics; this module holds its data model, how the signs weigh into a
verdict (:func:`weigh`) and how it reads. Update indices are 0-based in the
data and 1-based in the text, as in "after 30 updates".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from safeopt._remedies import Remedy

#: The verdicts, from the mildest.
VERDICTS: tuple[str, ...] = ("healthy", "signs", "exploding")
_MAX_LAYERS = 8  # layers the text lists (the data keeps them all)


@dataclasses.dataclass(frozen=True)
class Sign:
    """One sign of exploding gradients, as the monitor saw it.

    Attributes:
      key: The sign's name in :data:`safeopt._features.monitor.SIGNS`.
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
    """A parameter tensor whose gradient norm grew.

    Attributes:
      name: Parameter name (framework path), or ``param{i}`` without names.
      index: Position of the tensor in parameter order.
      norm: Mean of its raw gradient norm over the last ``monitor_window`` updates.
      over_fraction: Fraction (same window) of updates with a norm above 1.0.
      since: Update index since which that fraction stays above one half, or -1.
      growth: ``norm`` over the lowest value it had (NaN when unknown).
    """

    name: str
    index: int
    norm: float
    over_fraction: float
    since: int
    growth: float = math.nan


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What the monitor says about a run: signs, verdict, layers, remedies.

    ``str(diagnosis)`` reads as a short report.

    Attributes:
      updates: Updates seen (applied + skipped).
      applied: Updates applied.
      skipped: Updates skipped.
      signs: Every sign that fired during the run, in the order (a) to (e).
      layers: Layers whose gradient norm grew most, largest growth first
        (listed when sign (d) fired).
      remedies: What to try, in the order a practitioner would try it; only
        when the verdict is ``"exploding"``.
      window: The policy's ``monitor_window``.
      clipped: Applied updates whose gradient a norm clip changed.
      grad_norm: The raw (pre-clip) global gradient norm, its mean over the
        last ``monitor_window`` updates (NaN when not monitored).
      threshold: The norm-clip threshold in force (``inf`` without clipping).
      recoveries: Restores of a snapshot so far (policy ``recover``).
      rolled_back: Updates those restores discarded, in all.
      last_recovery: The last restore, ``{"at", "restored_to", "cause"}``
        as in :func:`safeopt.stats`, or ``None``.
      recovery_exhausted: The run diverged again with no recovery left.
    """

    updates: int
    applied: int
    skipped: int
    signs: tuple[Sign, ...] = ()
    layers: tuple[Layer, ...] = ()
    remedies: tuple[Remedy, ...] = ()
    window: int = 50
    clipped: int = 0
    grad_norm: float = math.nan
    threshold: float = math.inf
    recoveries: int = 0
    rolled_back: int = 0
    last_recovery: dict[str, Any] | None = None
    recovery_exhausted: bool = False

    @property
    def active(self) -> tuple[Sign, ...]:
        """The signs that fired within the last ``monitor_window`` updates."""
        return tuple(s for s in self.signs if s.active)

    @property
    def verdict(self) -> str:
        """``"healthy"``, ``"signs"`` (seen, not conclusive) or ``"exploding"`` (:func:`weigh`)."""
        return weigh(self.signs, self.window)[0]

    @property
    def reasons(self) -> tuple[str, ...]:
        """What makes the verdict ``"exploding"``, in words (empty otherwise)."""
        return weigh(self.signs, self.window)[1]

    @property
    def exploding(self) -> bool:
        """Whether the evidence is conclusive: the verdict is ``"exploding"``."""
        return self.verdict == "exploding"

    def fired(self, sign: str) -> bool:
        """Whether ``sign`` (a key such as ``"nonfinite"`` or a letter) ever fired."""
        return any(sign in (s.key, s.letter) for s in self.signs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, with the verdict (see :meth:`from_dict`)."""
        return jsonable({**dataclasses.asdict(self), "verdict": self.verdict})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        """Rebuilds a diagnosis from :meth:`to_dict`'s output (``null`` numbers read as NaN)."""
        return cls(
            updates=_int(data.get("updates")), applied=_int(data.get("applied")),
            skipped=_int(data.get("skipped")),
            signs=tuple(_sign(s) for s in data.get("signs") or ()),
            layers=tuple(_layer(la) for la in data.get("layers") or ()),
            remedies=tuple(Remedy(**r) for r in data.get("remedies") or ()),
            window=_int(data.get("window"), 50), clipped=_int(data.get("clipped")),
            grad_norm=_float(data.get("grad_norm")), threshold=_float(data.get("threshold")),
            recoveries=_int(data.get("recoveries")), rolled_back=_int(data.get("rolled_back")),
            last_recovery=data.get("last_recovery"),
            recovery_exhausted=bool(data.get("recovery_exhausted")),
        )

    def __str__(self) -> str:
        return "\n".join(_lines(self))


# ---------------------------------------------------------------------------
# The verdict.
# ---------------------------------------------------------------------------
def weigh(signs: Sequence[Sign], window: int) -> tuple[str, tuple[str, ...]]:
    """The verdict the signs support, and what makes it conclusive.

    * ``"exploding"``: conclusive evidence. NaN/Inf in the loss, the
      gradients (a) or the weights (c); or two of the runaway signs at once
      (their latest episodes within ``window`` updates of each other): the
      gradient norm grew tenfold (d), the loss was unstable or diverging
      (b), the weights grew fast (c).
    * ``"signs"``: some sign fired, none of the above. Each alone happens in
      healthy runs (a gradient norm that rises as the loss falls, a loss
      that plateaus or jumps when the data changes, weights that grow early
      on): worth watching, nothing to change.
    * ``"healthy"``: no sign fired.

    Returns:
      ``(verdict, reasons)``; the reasons are empty unless ``"exploding"``.
    """
    if not signs:
        return "healthy", ()
    by = {s.key: s for s in signs}
    reasons: list[tuple[int, str]] = []
    if "nonfinite" in by:
        first = _int(by["nonfinite"].data.get("first_nonfinite_step"), by["nonfinite"].since)
        reasons.append((first, f"the loss or gradients went NaN/Inf at update {nth(first)}"))
    weights = by.get("weight_growth")
    bad = -1 if weights is None else _int(weights.data.get("weight_nonfinite_step"), -1)
    if bad >= 0:
        reasons.append((bad, f"the weights went NaN/Inf at update {nth(bad)}"))
    pairs = (("grad_growth", "loss_unstable"), ("grad_growth", "weight_growth"),
             ("loss_unstable", "weight_growth"))
    for one, other in pairs:
        if one in by and other in by and _together(by[one], by[other], window):
            start = max(by[one].since, by[other].since)
            reasons.append((start, f"from update {nth(start)} {_PHRASES[one](by[one])} while "
                                   f"{_PHRASES[other](by[other])}"))
            break
    reasons.sort(key=lambda r: r[0])
    return ("exploding" if reasons else "signs"), tuple(text for _, text in reasons)


_PHRASES = {
    "grad_growth": lambda s: f"the gradient norm grew x{number(s.data.get('growth'))}",
    "loss_unstable": lambda s: "the loss was unstable or diverging",
    "weight_growth": lambda s: "the weights grew fast",
}


def _together(a: Sign, b: Sign | None, window: int) -> bool:
    """Whether the latest episodes of two signs overlap, within ``window`` updates."""
    return b is not None and a.since <= b.last + window and b.since <= a.last + window


# ---------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------
def nth(index: Any) -> str:
    """A 0-based update index as the text shows it: 1-based (``"-"`` when unknown)."""
    value = _int(index, -1)
    return str(value + 1) if value >= 0 else "-"


def number(value: Any, spec: str = ".3g") -> str:
    """``value`` formatted with ``spec``; ``None``, NaN and Inf read as such."""
    if value is None:
        return "n/a"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return format(f, spec) if math.isfinite(f) else str(f)


def _lines(d: Diagnosis) -> list[str]:
    clipped = f", {d.clipped} clipped" if d.clipped else ""
    head = (f"safeopt diagnosis after {d.updates} updates ({d.applied} applied, "
            f"{d.skipped} skipped{clipped}): ")
    verdict, reasons = weigh(d.signs, d.window)
    if verdict == "healthy":
        return [head + "healthy, no sign of exploding gradients.", *_clip_note(d),
                *_recovery_note(d)]
    if verdict == "exploding":
        lines = [head + "exploding gradients" + ("." if any(s.active for s in d.signs) else
                                                  f", not in the last {d.window} updates."),
                 "  Conclusive: " + "; ".join(reasons) + "."]
    else:
        lines = [head + "signs seen, but nothing conclusive of exploding gradients.",
                 "  Conclusive would be NaN/Inf, or two of (b) an unstable loss, (c) "
                 "fast-growing weights, (d) a growing gradient norm, at once."]
    lines += _clip_note(d) + _recovery_note(d)
    lines += ["", "Signs (updates counted from 1):"]
    for s in d.signs:
        when = (f"since update {nth(s.since)}" if s.active
                else f"updates {nth(s.since)}-{nth(s.last)}")
        state = "" if s.active else " (not active now)"
        lines.append(f"  ({s.letter}) {s.title}{state}: {when}, {s.count} update(s).")
        lines.append(f"      {str(s.evidence).rstrip('.')}.")
    if d.layers:
        lines += ["", "Layers whose gradient norm grew most:"]
        shown = d.layers[:_MAX_LAYERS]
        width = max(len(la.name) for la in shown)
        for la in shown:
            lines.append(f"  {la.name:<{width}}  norm ~{number(la.norm)}, x{number(la.growth)} "
                         f"its lowest, above 1.0 on {number(la.over_fraction, '.0%')} of "
                         "recent updates")
        if len(d.layers) > len(shown):
            lines.append(f"  and {len(d.layers) - len(shown)} more")
    if d.remedies and verdict == "exploding":
        lines += ["", "Remedies, in the order to try them:"]
        lines += [f"  {k}. {r.text}" for k, r in enumerate(d.remedies, 1)]
    return lines


def _clip_note(d: Diagnosis) -> list[str]:
    """A line on how much the norm clip did, when it changed most updates."""
    if d.applied <= 0 or d.clipped <= d.applied // 2:
        return []
    ratio = d.grad_norm / d.threshold if math.isfinite(d.threshold) and d.threshold > 0 \
        else math.nan
    return [f"  Note: the norm clip changed {d.clipped / d.applied:.0%} of the applied updates "
            f"(raw gradient norm ~{number(d.grad_norm)}, threshold {number(d.threshold)}, "
            f"x{number(ratio, '.2g')}); the loss and weights are those of the clipped run."]


def _recovery_note(d: Diagnosis) -> list[str]:
    """What recovery did: how often, the last restore and what fired, or that it ran out."""
    lines = []
    if d.recoveries:
        times = "once" if d.recoveries == 1 else f"{d.recoveries} times"
        lines.append(f"  Recovered {times} from a snapshot ({d.rolled_back} update(s) rolled "
                     "back in all).")
        last = d.last_recovery or {}
        if last:
            causes = "; ".join(last.get("cause") or ()) or "unknown"
            lines.append(f"  The last restore, at update {nth(last.get('at'))}, went back to "
                         f"the snapshot before update {nth(last.get('restored_to'))}: {causes}.")
    if d.recovery_exhausted:
        lines.append("  The run diverged again with no recovery left (max_recoveries).")
    return lines


# ---------------------------------------------------------------------------
# Reading back (JSON numbers may be null; logs of older versions lack fields).
# ---------------------------------------------------------------------------
def _int(value: Any, default: int = 0) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return int(f) if math.isfinite(f) else default


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _sign(data: dict[str, Any]) -> Sign:
    return Sign(key=str(data.get("key", "")), letter=str(data.get("letter", "?")),
                title=str(data.get("title", "")), since=_int(data.get("since"), -1),
                last=_int(data.get("last"), -1), count=_int(data.get("count")),
                active=bool(data.get("active")), evidence=str(data.get("evidence") or ""),
                data=dict(data.get("data") or {}))


def _layer(data: dict[str, Any]) -> Layer:
    return Layer(name=str(data.get("name", "?")), index=_int(data.get("index"), -1),
                 norm=_float(data.get("norm")), over_fraction=_float(data.get("over_fraction")),
                 since=_int(data.get("since"), -1), growth=_float(data.get("growth")))


def jsonable(value: Any) -> Any:
    """``value`` with NumPy numbers as Python numbers and NaN/Inf as ``None``."""
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
