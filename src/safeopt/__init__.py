"""safeopt: keep neural-network training alive when gradients explode.

Wrap the optimizer you already use; every step then follows a
:class:`Policy`: skip updates that carry NaN/Inf, add an L1/L2 penalty,
clip by value, clip by norm (global, per tensor or unitwise, with a fixed or
an adaptive threshold), skip loss spikes. The core imports no framework; the
adapters for PyTorch, Keras 3 and Optax are found through the entry-point
group ``safeopt.adapters``.

This module is the user's API. Plug-in authors find theirs in
:mod:`safeopt.adapter`, the telemetry sinks are in :mod:`safeopt.telemetry`,
and the conformance suite in :mod:`safeopt.testing`.

Example:
  >>> import safeopt
  >>> safeopt.Policy(clip_norm=1.0, clip_value=0.5).clip_value
  0.5
"""

from safeopt._data import skip_after_recovery
from safeopt._diagnose import diagnose
from safeopt._errors import AdapterError, DivergenceError, PolicyError
from safeopt._policy import Policy, load_policy
from safeopt._record import after_step
from safeopt._registry import preload as _preload
from safeopt._registry import wrap
from safeopt._summary import check, stats
from safeopt.telemetry import add_sink

__version__ = "0.2.0"

__all__ = [
    "AdapterError",
    "DivergenceError",
    "Policy",
    "PolicyError",
    "__version__",
    "add_sink",
    "after_step",
    "check",
    "diagnose",
    "load_policy",
    "skip_after_recovery",
    "stats",
    "wrap",
]

# Adapters of frameworks imported before safeopt register what those frameworks
# look up by themselves (Keras: the optimizer class ``load_model`` needs).
_preload()
