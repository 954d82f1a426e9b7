"""safeopt: keep neural-network training alive when gradients explode.

Wrap an existing optimizer; every step then follows a :class:`Policy`:
skip updates that carry NaN/Inf, add an L1/L2 penalty, clip by value, clip by
norm (global, per tensor or unitwise). The core imports no framework; the
adapters for PyTorch, Keras 3 and Optax are found through the entry-point
group ``safeopt.adapters``.

Example:
  >>> import safeopt
  >>> safeopt.Policy(clip_norm=1.0, clip_value=0.5).clip_value
  0.5
"""

from safeopt._decide import (
    Decision,
    GradStats,
    PolicyState,
    clip_scale,
    decide,
    global_norm,
    init_state,
    penalty_coefficients,
    protect,
    unit_norms,
    unit_scale,
)
from safeopt._diagnose import Diagnosis, diagnose, diagnose_state
from safeopt._errors import AdapterError, DivergenceError, PolicyError
from safeopt._policy import ENV_VAR, KEYS, PRESETS, Policy, PolicyLike, load_policy
from safeopt._registry import (
    GROUP,
    Adapter,
    check,
    installed_adapters,
    raise_if_diverged,
    read_state,
    stats,
    summarize,
    wrap,
)
from safeopt._telemetry import (
    JsonlSink,
    LoggingSink,
    TensorBoardSink,
    add_sink,
    after_step,
    remove_sink,
)
from safeopt._xp import Namespace, namespace, namespace_by_name

__version__ = "0.1.0"

__all__ = [
    "ENV_VAR",
    "GROUP",
    "KEYS",
    "PRESETS",
    "Adapter",
    "AdapterError",
    "Decision",
    "Diagnosis",
    "DivergenceError",
    "GradStats",
    "JsonlSink",
    "LoggingSink",
    "Namespace",
    "Policy",
    "PolicyError",
    "PolicyLike",
    "PolicyState",
    "TensorBoardSink",
    "__version__",
    "add_sink",
    "after_step",
    "check",
    "clip_scale",
    "decide",
    "diagnose",
    "diagnose_state",
    "global_norm",
    "init_state",
    "installed_adapters",
    "load_policy",
    "namespace",
    "namespace_by_name",
    "penalty_coefficients",
    "protect",
    "raise_if_diverged",
    "read_state",
    "remove_sink",
    "stats",
    "summarize",
    "unit_norms",
    "unit_scale",
    "wrap",
]
