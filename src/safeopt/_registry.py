"""Adapter discovery, :func:`wrap`, and finding the adapter that owns an object.

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
import importlib
import inspect
import sys
import warnings
from importlib import metadata
from importlib.util import find_spec
from typing import Any

from safeopt._errors import AdapterError
from safeopt._policy import Policy, PolicyLike, load_policy
from safeopt._state import State

GROUP = "safeopt.adapters"
#: Modules ``import safeopt`` imports when their framework (the entry point's name)
#: is already imported: see :func:`preload`.
PRELOAD = "safeopt.preload"

#: Attributes through which trainers' optimizer wrappers reach the optimizer they
#: wrap (accelerate's ``AcceleratedOptimizer.optimizer``, Lightning's
#: ``LightningOptimizer._optimizer``), followed by :func:`owner`.
_WRAPPED_ATTRS = ("optimizer", "_optimizer")


class Adapter(abc.ABC):
    """What a framework adapter provides to the core.

    Subclass it in a plug-in distribution and register the class (or an
    instance) under the entry-point group ``safeopt.adapters``, named after
    the framework's top-level module.

    Attributes:
      name: Short name shown in messages and ``safeopt.stats(...)["framework"]``.
      demo: Module path of the adapter's ``safeopt demo`` tasks (``None``: no demo).
    """

    name: str = "?"
    demo: str | None = None

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
    def read(self, obj: Any) -> tuple[Policy, State, dict[str, Any]]:
        """Reads ``(policy, state as NumPy arrays, extra facts)`` from ``obj``.

        This is where the host synchronisation happens. ``extra`` holds
        adapter facts: ``names`` (parameter names in tensor order), ``path``
        (the execution path), and anything else worth reporting.
        """


@functools.lru_cache(maxsize=1)
def _installed() -> Any:
    """Every entry point installed (one scan, for both groups; ``SelectableGroups`` < 3.12)."""
    return metadata.entry_points()


@functools.cache
def _group(group: str) -> tuple[metadata.EntryPoint, ...]:
    return tuple(_installed().select(group=group))


def _entry_points() -> tuple[metadata.EntryPoint, ...]:
    return _group(GROUP)


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
            f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)
    _LOADED[key] = adapter
    return adapter


def _framework_root(ep: metadata.EntryPoint) -> str:
    return ep.name.split(".")[0]


def active_adapters(obj: Any = None) -> list[Adapter]:
    """Adapters whose framework the caller has imported, the best match for ``obj`` first."""
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


def preload() -> None:
    """Imports the ``safeopt.preload`` modules of the frameworks imported before safeopt.

    Run by ``import safeopt``. A framework may look up an adapter's classes by
    itself, before safeopt is called: Keras finds safeopt's optimizer class in
    ``keras.models.load_model`` only once its adapter has registered it. An
    adapter lists such modules under the entry-point group ``safeopt.preload``,
    named after the framework; the others load on first use. A module already
    imported (or being imported) is left alone; one that fails to import
    becomes a warning.
    """
    for ep in _group(PRELOAD):
        if _framework_root(ep) in sys.modules and ep.value.split(".")[0] not in sys.modules:
            try:
                importlib.import_module(ep.value)
            except Exception as err:  # a broken plug-in must not break `import safeopt`
                warnings.warn(f"safeopt could not preload {ep.value!r} for {ep.name!r}: "
                              f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)


def adapter_for_framework(name: str) -> Adapter | None:
    """The adapter registered under the framework ``name`` (imported by the caller)."""
    for ep in _entry_points():
        if ep.name == name and _framework_root(ep) in sys.modules:
            return _load(ep)
    return None


def installed_adapters() -> list[dict[str, str]]:
    """Lists the installed adapters: entry-point name, target and status.

    The status says whether the adapter is loaded, failed to load, or is
    waiting for its framework, which is either importable (installed but not
    imported yet) or not installed at all.
    """
    rows = []
    for ep in _entry_points():
        root = _framework_root(ep)
        if root in sys.modules:
            status = "loaded" if _load(ep) is not None else "failed to load"
        elif _importable(root):
            status = "installed (loads when you import it)"
        else:
            status = f"{root} not installed"
        rows.append({"name": ep.name, "value": ep.value, "status": status})
    return rows


def _importable(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed_text() -> str:
    """The installed adapters in one line, for error messages."""
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
    for adapter in active_adapters(optimizer):
        if adapter.owns(optimizer):
            raise AdapterError(f"{type(optimizer).__name__} is already wrapped by safeopt; "
                               "wrap the inner optimizer once.")
        if adapter.accepts(optimizer):
            return adapter.wrap(optimizer, resolved)
    raise AdapterError(
        f"No installed safeopt adapter accepts {type(optimizer).__module__}."
        f"{type(optimizer).__qualname__}{_call_hint(optimizer)}. "
        f"Installed adapters: {installed_text()}.")


def _call_hint(optimizer: Any) -> str:
    """A hint when ``optimizer`` is the factory, not the optimizer (``optax.adamw``)."""
    if inspect.isclass(optimizer) or inspect.isfunction(optimizer):
        kind = "class" if inspect.isclass(optimizer) else "function"
        name = optimizer.__name__
        return f" ({name} is a {kind}: call it, e.g. safeopt.wrap({name}(...)))"
    return ""


def owner(obj: Any) -> tuple[Adapter, Any]:
    """The adapter that made ``obj``, and the wrapped object itself.

    Trainers' optimizer wrappers (accelerate, Lightning) are looked through.

    Raises:
      AdapterError: nothing safeopt made is found in ``obj``.
    """
    seen = obj
    for _ in range(4):
        for adapter in active_adapters(seen):
            if adapter.owns(seen):
                return adapter, seen
        inner = next((getattr(seen, a) for a in _WRAPPED_ATTRS
                      if getattr(seen, a, None) is not None), None)
        if inner is None or inner is seen:
            break
        seen = inner
    raise AdapterError(
        f"{type(obj).__qualname__} was not made by safeopt.wrap (nor does it hold an optimizer "
        f"that was). Installed adapters: {installed_text()}.")


def read_state(obj: Any) -> tuple[Policy, State, dict[str, Any]]:
    """``(policy, state as NumPy arrays, extra)`` of a wrapped optimizer or its state.

    One host synchronisation. ``extra["framework"]`` names the adapter.
    """
    adapter, found = owner(obj)
    policy, state, extra = adapter.read(found)
    return policy, state, {"framework": adapter.name, **extra}
