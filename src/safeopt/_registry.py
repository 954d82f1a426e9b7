"""Adapter discovery and the user-facing ``wrap`` / ``stats``.

Adapters are found through the entry-point group ``safeopt.adapters``. The
name of an entry point is the top-level module of the framework it adapts
(``torch``, ``optax``, ``keras``, ``mlx``...): it is loaded only once the
caller has imported that framework (as einops looks up its backends), so
safeopt never imports a framework itself. Entry points are read once and
cached; one that fails to load becomes a warning, not a crash (as xarray
loads its backends).
"""

from __future__ import annotations

import abc
import functools
import math
import sys
import warnings
from importlib import metadata
from typing import Any

import numpy as np

from safeopt._decide import PolicyState
from safeopt._errors import AdapterError, DivergenceError
from safeopt._policy import Policy, PolicyLike, load_policy

GROUP = "safeopt.adapters"


class Adapter(abc.ABC):
    """What a framework adapter provides to the core.

    Subclass it in a plug-in distribution and register an instance (or the
    class) under the entry-point group ``safeopt.adapters``, named after the
    framework's top-level module.
    """

    #: Short name shown in messages and ``safeopt.stats(...)["framework"]``.
    name: str = "?"

    @abc.abstractmethod
    def accepts(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` is an optimizer this adapter can wrap."""

    @abc.abstractmethod
    def wrap(self, optimizer: Any, policy: Policy) -> Any:
        """Returns ``optimizer`` wrapped so that every step follows ``policy``."""

    @abc.abstractmethod
    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` is a wrapped optimizer (or its state) made by this adapter."""

    @abc.abstractmethod
    def read(self, obj: Any) -> tuple[Policy, PolicyState, dict[str, Any]]:
        """Reads ``(policy, state as NumPy arrays, extra info)`` from ``obj``.

        This is where the host synchronisation happens; ``extra`` holds
        adapter facts such as which execution path the optimizer takes.
        """


@functools.lru_cache(maxsize=1)
def _entry_points() -> tuple[metadata.EntryPoint, ...]:
    return tuple(metadata.entry_points(group=GROUP))


_LOADED: dict[str, Adapter | None] = {}


def _load(ep: metadata.EntryPoint) -> Adapter | None:
    key = f"{ep.name}={ep.value}"
    if key in _LOADED:
        return _LOADED[key]
    adapter: Adapter | None = None
    try:
        obj = ep.load()
        adapter = obj() if isinstance(obj, type) else obj
    except Exception as err:  # a broken plug-in must not break safeopt
        warnings.warn(
            f"safeopt adapter {ep.name!r} ({ep.value}) failed to load and is ignored: "
            f"{type(err).__name__}: {err}",
            RuntimeWarning,
            stacklevel=3,
        )
    _LOADED[key] = adapter
    return adapter


def _framework_root(ep: metadata.EntryPoint) -> str:
    return ep.name.split(".")[0]


def _active_adapters(obj: Any = None) -> list[Adapter]:
    """Adapters whose framework the caller has imported, best match first."""
    roots = set()
    if obj is not None:
        roots = {cls.__module__.split(".")[0] for cls in type(obj).__mro__}
    ranked = sorted(_entry_points(), key=lambda ep: _framework_root(ep) not in roots)
    adapters = []
    for ep in ranked:
        if _framework_root(ep) in sys.modules:
            adapter = _load(ep)
            if adapter is not None:
                adapters.append(adapter)
    return adapters


def installed_adapters() -> list[dict[str, str]]:
    """Lists the installed adapters: entry-point name, target and whether active."""
    rows = []
    for ep in _entry_points():
        active = _framework_root(ep) in sys.modules
        status = "framework not imported"
        if active:
            status = "loaded" if _load(ep) is not None else "failed to load"
        rows.append({"name": ep.name, "value": ep.value, "status": status})
    return rows


def _installed_text() -> str:
    rows = installed_adapters()
    if not rows:
        return "none (install safeopt with an extra, e.g. pip install 'safeopt[torch]')"
    return ", ".join(f"{r['name']} ({r['status']})" for r in rows)


def wrap(optimizer: Any, policy: PolicyLike = None) -> Any:
    """Wraps ``optimizer`` so that every step follows ``policy``.

    Args:
      optimizer: A ``torch.optim.Optimizer``, a Keras 3 optimizer, an Optax
        ``GradientTransformation``, or anything an installed plug-in accepts.
      policy: A :class:`Policy`, a mapping of config keys, a preset name, a
        path to a TOML/YAML/JSON file, or ``None`` (``$SAFEOPT_CONFIG``, then
        the defaults).

    Returns:
      The framework's own kind of optimizer, protected.

    Raises:
      PolicyError: the policy is invalid (checked before anything else).
      AdapterError: no installed adapter accepts ``optimizer``.

    Example:
      >>> import safeopt, torch
      >>> model = torch.nn.Linear(4, 2)
      >>> opt = safeopt.wrap(torch.optim.SGD(model.parameters(), lr=0.1), {"clip_norm": 1.0})
    """
    resolved = load_policy(policy)
    for adapter in _active_adapters(optimizer):
        if adapter.owns(optimizer):
            raise AdapterError(
                f"{type(optimizer).__name__} is already wrapped by safeopt; wrap the inner "
                "optimizer once."
            )
        if adapter.accepts(optimizer):
            return adapter.wrap(optimizer, resolved)
    raise AdapterError(
        f"No installed safeopt adapter accepts {type(optimizer).__module__}."
        f"{type(optimizer).__qualname__}. Installed adapters: {_installed_text()}."
    )


def _owner(obj: Any) -> Adapter:
    for adapter in _active_adapters(obj):
        if adapter.owns(obj):
            return adapter
    raise AdapterError(
        f"{type(obj).__qualname__} was not made by safeopt.wrap (or its state). "
        f"Installed adapters: {_installed_text()}."
    )


def read_state(obj: Any) -> tuple[Policy, PolicyState, dict[str, Any]]:
    """Reads ``(policy, state, extra)`` of a wrapped optimizer or its state (host sync)."""
    return _owner(obj).read(obj)


def stats(obj: Any) -> dict[str, Any]:
    """Returns safeopt's counters and statistics as plain Python numbers.

    Reading them is the one place where a host synchronisation is allowed.

    Args:
      obj: A wrapped optimizer (torch, Keras) or the state of a wrapped
        Optax transformation.

    Returns:
      A dict with ``steps`` (applied updates), ``skips``,
      ``consecutive_skips``, ``nonfinite``, ``spikes``, ``norm_clips``,
      ``value_clips``, ``last_norm``, ``last_scale``, ``threshold``,
      ``last_loss`` and adapter facts such as ``framework`` and ``path``.
    """
    adapter = _owner(obj)
    policy, state, extra = adapter.read(obj)
    return summarize(policy, state, {"framework": adapter.name, **extra})


def summarize(policy: Policy, state: PolicyState, extra: dict[str, Any] | None = None,
              ) -> dict[str, Any]:
    """Turns a host copy of the state into the dict :func:`stats` returns."""
    out: dict[str, Any] = {}
    for name in ("steps", "skips", "consecutive_skips", "nonfinite", "spikes", "norm_clips",
                 "value_clips"):
        out[name] = int(np.asarray(getattr(state, name)))
    for name in ("last_norm", "last_scale", "threshold", "last_loss", "last_weight_norm"):
        out[name] = float(np.asarray(getattr(state, name)))
    out["policy"] = "off" if policy.is_noop else "on"
    out.update(extra or {})
    out["clip_rate"] = out["norm_clips"] / out["steps"] if out["steps"] else 0.0
    out["skip_rate"] = out["skips"] / max(out["steps"] + out["skips"], 1)
    if math.isnan(out["last_weight_norm"]):
        out.pop("last_weight_norm")
    return out


def check(obj: Any) -> dict[str, Any]:
    """Reads the counters and raises if the run is diverging (a host boundary).

    Adapters call it where they already synchronise; in compiled training
    loops (``jax.jit``) call it yourself every few steps.

    Args:
      obj: A wrapped optimizer or the state of a wrapped Optax transformation.

    Returns:
      :func:`stats` of ``obj``.

    Raises:
      DivergenceError: ``max_consecutive_skips`` updates in a row were skipped.
    """
    adapter = _owner(obj)
    policy, state, extra = adapter.read(obj)
    counters = summarize(policy, state, {"framework": adapter.name, **extra})
    raise_if_diverged(policy, counters, obj)
    return counters


def raise_if_diverged(policy: Policy, counters: dict[str, Any], obj: Any = None) -> None:
    """Raises :class:`DivergenceError` when ``counters`` show too many skips in a row.

    Args:
      policy: The policy in force (``max_consecutive_skips``).
      counters: At least ``consecutive_skips`` (as :func:`stats` returns).
      obj: The wrapped optimizer or state, to attach its diagnosis.
    """
    limit = policy.max_consecutive_skips
    streak = int(counters["consecutive_skips"])
    if limit is None or streak < limit:
        return
    raise DivergenceError(
        f"safeopt skipped {streak} consecutive updates (max_consecutive_skips={limit}): "
        "the gradients or the loss keep coming out NaN/Inf, so training stops here instead "
        "of going on with garbage. Lower the learning rate, check the data and the loss for "
        "NaN, or raise max_consecutive_skips.",
        diagnosis=_diagnosis_of(obj),
        stats=counters,
    )


def _diagnosis_of(obj: Any) -> Any:
    if obj is None:
        return None
    try:
        from safeopt._diagnose import diagnose
    except ImportError:
        return None
    try:
        return diagnose(obj)
    except Exception as err:  # the error must still be raised
        warnings.warn(f"safeopt could not diagnose the run: {err}", RuntimeWarning, stacklevel=3)
        return None
