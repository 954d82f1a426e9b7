"""What a diagnosis says: the signs that fired, the hot layers, the remedies, as data and text.

:mod:`safeopt._diagnose` builds a :class:`Diagnosis` from the monitor's
statistics; this module holds its data model and how it reads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from safeopt._remedies import Remedy


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
