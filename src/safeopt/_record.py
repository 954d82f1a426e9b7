"""Telemetry records: what :func:`after_step` reads, builds and hands to the sinks.

Nothing is recorded unless ``policy.log_every > 0``. Then, every
``log_every``-th step, :func:`after_step` reads safeopt's state once (one
host synchronisation per interval, none in between) and hands one record
(:func:`make_record`) to every sink of :mod:`safeopt.telemetry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from safeopt._diagnose import diagnose_state, layer_names
from safeopt._diagnosis import jsonable
from safeopt._divergence import raise_if_diverged
from safeopt._policy import Policy
from safeopt._recovered import recovery_summary
from safeopt._registry import read_state
from safeopt._state import State
from safeopt._summary import COUNTERS
from safeopt.telemetry import sinks_for

_LOGGED: dict[int, int] = {}  # id(obj) -> last step recorded, so that a second call is a no-op


def policy_of(obj: Any) -> Policy:
    """The policy of a wrapped optimizer or Optax state, without a host read when possible."""
    for candidate in (getattr(obj, "policy", None), getattr(getattr(obj, "info", None),
                                                            "policy", None)):
        if isinstance(candidate, Policy):
            return candidate
    return read_state(obj)[0]


def checked_log_every(log_every: int | None) -> int | None:
    """Validates a callback's ``log_every`` override (``None``: keep the policy's)."""
    if log_every is not None and (
        isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1
    ):
        raise ValueError(
            f"`log_every` must be an integer >= 1 or None. Received: log_every={log_every!r}"
        )
    return log_every


def with_log_every(policy: Policy, log_every: int | None) -> Policy:
    """``policy`` with a callback's ``log_every`` override applied."""
    if log_every is None or policy.log_every == log_every:
        return policy
    return policy.replace(log_every=log_every)


def telemetry_due(policy: Policy, step: int) -> bool:
    """Whether ``step`` is a telemetry step of ``policy`` (pure Python, no device)."""
    return policy.log_every > 0 and step % policy.log_every == 0


def after_step(obj: Any, step: int, policy: Policy | None = None, *, loss: Any = None,
               check: bool = True) -> dict[str, Any] | None:
    """Records every ``log_every`` steps: what an adapter (or a jitted loop) calls each step.

    Costs one integer test on other steps. On a telemetry step with at least
    one sink (and not yet recorded for ``obj``: calling it twice for one step
    writes once), reads the state once, writes the record to every sink and,
    with ``check``, raises :class:`safeopt.DivergenceError` when the run is
    diverging (a host boundary where raising is possible).

    Args:
      obj: The wrapped optimizer (torch, Keras) or the wrapped Optax state.
      step: The host step counter (1 after the first step).
      policy: The policy, when the caller has it at hand.
      loss: A loss the framework has on the host already (Keras ``logs``),
        recorded when the state has none (the loss was not passed to the step).
      check: Also raise on divergence.

    Returns:
      The record written, or ``None`` when nothing was recorded.
    """
    policy = policy_of(obj) if policy is None else policy
    if not telemetry_due(policy, step):
        return None
    sinks = sinks_for(policy)
    if not sinks or _LOGGED.get(id(obj)) == step:
        return None
    if len(_LOGGED) > 1024:
        _LOGGED.clear()
    _LOGGED[id(obj)] = step
    policy, state, extra = read_state(obj)
    rec = make_record(policy, state, extra, step=step, loss=loss)
    for sink in sinks:
        sink.write(rec)
    if check:
        raise_if_diverged(policy, rec, obj)
    return rec


def record(obj: Any, step: int | None = None) -> dict[str, Any]:
    """Reads ``obj`` once and returns its record (whatever ``log_every`` says)."""
    policy, state, extra = read_state(obj)
    return make_record(policy, state, extra, step=step)


def make_record(policy: Policy, state: State, extra: Mapping[str, Any] | None = None,
                step: int | None = None, loss: Any = None) -> dict[str, Any]:
    """Builds a record from a host copy of the state (pure).

    Args:
      policy: The run's policy.
      state: The state, fields convertible by ``numpy.asarray``.
      extra: The adapter's ``read`` extra (``names``, ``path``, ``framework``).
      step: The host step; ``steps + skips`` when ``None``.
      loss: A host loss that fills in when the state has none (the run did
        not pass its loss to the step).
    """
    extra = dict(extra or {})
    c = state.counters

    def num(name: str) -> float:
        return float(np.asarray(getattr(c, name)))

    counts = {name: int(np.asarray(getattr(c, name))) for name in COUNTERS}
    updates = counts["steps"] + counts["skips"]
    given = int(np.asarray(c.loss_updates)) > 0
    names = extra.get("names")
    diagnosis = diagnose_state(policy, state, names)
    rec: dict[str, Any] = {
        "step": updates if step is None else int(step),
        "updates": updates,
        "applied": counts.pop("steps"),
        **counts,
        "grad_norm": num("last_norm"),
        "scale": num("last_scale"),
        "threshold": num("threshold"),
        "clipped": bool(np.asarray(c.last_clipped)),
        "skipped": counts["consecutive_skips"] > 0,
        "weight_norm": num("last_weight_norm"),
        "loss": num("last_loss") if given else (None if loss is None else float(loss)),
        **recovery_summary(state),
        "layers": _top_layers(state, layer_names(names, _n_layers(state)), policy.log_top_k),
        "signs": [s.letter for s in diagnosis.active],
        "diagnosis": diagnosis.to_dict(),
    }
    for key in ("framework", "path"):
        if key in extra:
            rec[key] = extra[key]
    return jsonable(rec)


def _n_layers(state: State) -> int:
    counts = getattr(state.monitor, "layer_count", None)
    return 0 if counts is None else int(np.asarray(counts).shape[0])


def _top_layers(state: State, names: list[str], k: int) -> dict[str, float]:
    """The ``k`` largest per-layer gradient-norm EMAs, of the layers seen so far."""
    if not _n_layers(state):
        return {}
    m = state.monitor
    ema = np.asarray(m.layer_norm_ema, dtype=np.float64)  # type: ignore[union-attr]
    seen = np.asarray(m.layer_count) > 0  # type: ignore[union-attr]
    order = [i for i in np.argsort(-np.nan_to_num(ema, nan=np.inf), kind="stable") if seen[i]]
    return {names[i]: float(ema[i]) for i in order[:k]}
