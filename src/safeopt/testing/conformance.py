"""The conformance harness: one table of cases, run in every framework, compared.

A framework's test runs each case of :data:`safeopt.testing.CASES` through
its public API (the inner optimizer is plain SGD with learning rate 1, so
``new = params - effective_gradient``) and returns a :data:`Trace`: after
every update, a :class:`Snapshot` of the parameters, :func:`safeopt.stats`,
the telemetry record, every field of safeopt's state and the divergence
error raised, if any. :func:`check` compares it with the NumPy reference
(:func:`reference`): exactly for counters, flags and indices, to float32
tolerance for values; and it checks the case's hand-written expectations,
which hold the reference itself to account.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from safeopt._diagnose import layer_names
from safeopt._divergence import raise_if_diverged, raise_recovery_exhausted
from safeopt._errors import DivergenceError
from safeopt._features.recovery import after_restore
from safeopt._kernels import Kernels
from safeopt._pipeline import step
from safeopt._policy import Policy, load_policy
from safeopt._record import make_record
from safeopt._registry import read_state
from safeopt._state import State, flatten, init_state
from safeopt._summary import check as check_divergence
from safeopt._summary import summarize
from safeopt._xp import namespace_by_name
from safeopt.testing.cases import Case

#: Facts that differ by framework and are not compared.
_FACTS = ("framework", "path", "decisions", "names", "host_step", "inner", "backend",
          "iterations", "policy")


class Snapshot(NamedTuple):
    """Everything observable after one update."""

    params: list[np.ndarray]  # in the case's (in, out) layout
    stats: dict[str, Any]
    record: dict[str, Any]
    state: dict[str, Any]  # "feature.field" (per-layer fields: "feature.field[name]")
    error: str | None  # the first line of the DivergenceError raised at this update


Trace = list[Snapshot]


def policy_of(case: Case) -> Policy:
    """The case's policy, validated."""
    return load_policy(case.policy)


def snapshot(obj: Any, params: Sequence[Any], error: str | None = None) -> Snapshot:
    """Reads ``obj`` (a wrapped optimizer or Optax state) through the public API.

    Args:
      obj: What :func:`safeopt.wrap` returned, or the wrapped Optax state.
      params: The parameters after the update, in the case's layout.
      error: The first line of a divergence error raised at this update.
    """
    policy, state, extra = read_state(obj)
    return _snapshot(policy, state, extra, params, error)


def _snapshot(policy: Policy, state: State, extra: Mapping[str, Any], params: Sequence[Any],
              error: str | None) -> Snapshot:
    names = [str(n) for n in extra.get("names", [])]
    stats = {k: v for k, v in summarize(policy, state, dict(extra)).items() if k not in _FACTS}
    record = {k: v for k, v in make_record(policy, state, extra).items() if k not in _FACTS}
    return Snapshot([np.array(p, dtype=np.float32) for p in params], stats, record,
                    _by_name(state, names), error)


def _by_name(state: State, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flatten(state).items():
        array = np.asarray(value)
        if key.startswith("monitor.layer_"):
            for name, v in zip(layer_names(names, array.shape[0]), array):
                out[f"{key}[{name}]"] = v
        else:
            out[key] = array
    return out


def first_line(err: BaseException) -> str:
    """The first line of an error message (a diagnosis may follow it)."""
    return str(err).splitlines()[0]


def guarded(update: Callable[[], Any], obj: Callable[[], Any]) -> str | None:
    """Runs ``update`` then :func:`safeopt.check` on ``obj()``; returns a divergence, if any."""
    try:
        update()
        check_divergence(obj())
    except DivergenceError as err:
        return first_line(err)
    return None


def reference(case: Case) -> Trace:
    """Runs ``case`` through the NumPy reference: the core's step with the default kernels.

    With ``recover``, the reference keeps the snapshot (parameters and
    state before the update that takes it) and restores it on a recovery,
    as every adapter must.
    """
    policy = policy_of(case)
    xp = namespace_by_name("numpy")
    kernels = Kernels(xp)
    params = case.arrays("params")
    state = init_state(xp, policy, n_tensors=len(params))
    snapshot: tuple[list[np.ndarray], State] | None = None
    trace: Trace = []
    for update in case.updates:
        params = case.set_weights(params, update)
        present = [i for i, g in enumerate(update.grads) if g is not None]
        grads = [np.asarray(update.grads[i], np.float32) for i in present]
        loss = None if update.loss is None else np.float32(update.loss)
        with np.errstate(all="ignore"):
            out = step(kernels, policy, state, grads, [params[i] for i in present], loss,
                       positions=present, n_tensors=len(params))
        d = out.decision
        error = None
        if d.snapshot is not None and bool(d.snapshot):
            snapshot = ([p.copy() for p in params], state)
        if d.recover is not None and bool(d.recover):
            state, params, error = _recover(policy, out.state, params, snapshot)
        else:
            state = out.state
            if not bool(d.skip):
                factor = 1.0 if d.lr_factor is None else float(d.lr_factor)
                for i, g in zip(present, out.grads):
                    params[i] = (params[i] - np.float32(factor) * g).astype(np.float32)
        if error is None:
            try:
                check_divergence_state(policy, state)
            except DivergenceError as err:
                error = first_line(err)
        extra = {"names": list(case.names)}
        trace.append(_snapshot(policy, state, extra, [p.copy() for p in params], error))
    return trace


def _recover(policy: Policy, now: State, params: list[np.ndarray],
             snapshot: tuple[list[np.ndarray], State] | None,
             ) -> tuple[State, list[np.ndarray], str | None]:
    """Restores ``snapshot``, or gives the error of a recovery that cannot be made."""
    recoveries = int(np.asarray(now.recovery.recoveries))  # type: ignore[union-attr]
    if snapshot is None or recoveries >= policy.max_recoveries:
        try:
            raise_recovery_exhausted(policy, summarize(policy, now))
        except DivergenceError as err:
            return now, params, first_line(err)
    assert snapshot is not None
    xp = namespace_by_name("numpy")
    return after_restore(xp, now, snapshot[1]), [p.copy() for p in snapshot[0]], None


def check_divergence_state(policy: Policy, state: State) -> None:
    """The divergence check on a host state (what :func:`safeopt.check` runs)."""
    raise_if_diverged(policy, summarize(policy, state))


def check(case: Case, trace: Trace, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Asserts that ``trace`` agrees with the reference and meets the case's expectations."""
    want = reference(case)
    assert len(trace) == len(want), f"{case.name}: {len(trace)} updates, want {len(want)}"
    for i, (got, ref) in enumerate(zip(trace, want)):
        where = f"{case.name}, update {i}"
        assert got.error == ref.error, f"{where}: error {got.error!r} != {ref.error!r}"
        _close(got.params, ref.params, f"{where}, params", rtol, atol)
        _close(got.stats, ref.stats, f"{where}, stats", rtol, atol)
        _close(got.record, ref.record, f"{where}, record", rtol, atol)
        _close_state(got.state, ref.state, f"{where}, state", rtol, atol)
    expect(case, trace)


def expect(case: Case, trace: Trace, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Asserts the case's hand-written expectations on ``trace``."""
    name = case.name
    if case.skipped is not None:
        skips = [0] + [s.record["skips"] for s in trace]
        got = tuple(b > a for a, b in itertools.pairwise(skips))
        assert got == case.skipped, f"{name}: skipped {got} != {case.skipped}"
    if case.final is not None:
        _close(trace[-1].params, case.arrays("final"), f"{name}: final params", rtol, atol)
    for key, value in case.counters.items():
        _close(trace[-1].stats[key], value, f"{name}: stats[{key!r}]", rtol, atol)
    signs = {s["letter"]: s["since"] for s in trace[-1].record["diagnosis"]["signs"]}
    for letter, since in case.signs.items():
        assert signs.get(letter) == since, f"{name}: sign ({letter}) since {signs.get(letter)}"
    if case.clipped is not None:
        got = tuple(bool(s.record["clipped"]) for s in trace)
        assert got == case.clipped, f"{name}: clipped {got} != {case.clipped}"
    if case.diverges_at is not None:
        first = next((i for i, s in enumerate(trace) if s.error is not None), None)
        assert first == case.diverges_at, f"{name}: diverged at {first}"


def _close_state(got: dict[str, Any], want: dict[str, Any], where: str, rtol: float,
                 atol: float) -> None:
    """Compares state fields; a layer a framework never saw must be unseen in the reference."""
    missing = set(want) - set(got)
    for key in missing:
        layer = key[key.index("["):]
        assert key.startswith("monitor.layer_"), f"{where}: {key} missing"
        assert int(want[f"monitor.layer_count{layer}"]) == 0, f"{where}: {key} missing"
    assert not set(got) - set(want), f"{where}: extra fields {sorted(set(got) - set(want))}"
    for key in want.keys() - missing:
        _close(got[key], want[key], f"{where}: {key}", rtol, atol)


def _close(got: Any, want: Any, where: str, rtol: float, atol: float) -> None:
    """Exact for ints, bools, strings and None; ``rtol``/``atol`` for floats (NaN == NaN)."""
    if isinstance(want, Mapping):
        assert isinstance(got, Mapping), where
        keys = set(want) - {"evidence", "text"}  # prose: numbers formatted from floats
        assert set(got) - {"evidence", "text"} == keys, f"{where}: keys {sorted(got)}"
        for key in keys:
            _close(got[key], want[key], f"{where}.{key}", rtol, atol)
        return
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got}"
        for i, (a, b) in enumerate(zip(got, want)):
            _close(a, b, f"{where}[{i}]", rtol, atol)
        return
    w, g = np.asarray(want), np.asarray(got)
    if w.dtype.kind == "f" or g.dtype.kind == "f":
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol,
                                   atol=atol, equal_nan=True, err_msg=where)
    elif want is None or isinstance(want, str):
        assert got == want, f"{where}: {got!r} != {want!r}"
    else:
        np.testing.assert_array_equal(g, w, err_msg=where, strict=False)
        assert g.shape == w.shape, where
