"""The plug-in author's API: what an adapter for a new framework builds on.

An adapter subclasses :class:`Adapter` (registered under the entry-point
group ``safeopt.adapters``) and runs :func:`step` (gather, decide, apply)
with the framework's :class:`Kernels` on every update; its shell skips the
inner optimizer's update when ``decision.skip`` is set. The core then gives
it, without a line of its own: :func:`safeopt.stats`, the divergence check
(:func:`raise_if_diverged`, with a diagnosis), telemetry (:func:`after_step`)
and :func:`safeopt.diagnose`. ``tests/plugins/safeopt_toy`` is a complete
adapter in a few dozen lines; :mod:`safeopt.testing` is the conformance
suite every adapter runs.
"""

from safeopt._diagnose import diagnose_state, layer_names
from safeopt._diagnosis import Diagnosis
from safeopt._divergence import raise_if_diverged, raise_recovery_exhausted
from safeopt._features.base import EMPTY, Empty
from safeopt._features.recovery import after_restore
from safeopt._features.scope import clip_scale, inverse_scale, unit_scale
from safeopt._kernels import Kernels
from safeopt._legacy import FIELDS_0_1, is_legacy, upgrade
from safeopt._pipeline import (
    Decision,
    GradStats,
    Step,
    apply,
    decide,
    gather,
    monitor_due,
    step,
)
from safeopt._policy import PRESETS, Policy, PolicyLike, load_policy
from safeopt._record import (
    after_step,
    checked_log_every,
    make_record,
    record,
    telemetry_due,
    with_log_every,
)
from safeopt._registry import (
    GROUP,
    Adapter,
    adapter_for_framework,
    installed_adapters,
    read_state,
)
from safeopt._snapshots import HostRecovery
from safeopt._state import (
    FEATURES,
    State,
    flatten,
    init_state,
    keep_on_skip,
    map_state,
    unflatten,
)
from safeopt._summary import summarize
from safeopt._xp import Array, Namespace, namespace, namespace_by_name

__all__ = [
    "EMPTY",
    "FEATURES",
    "FIELDS_0_1",
    "GROUP",
    "PRESETS",
    "Adapter",
    "Array",
    "Decision",
    "Diagnosis",
    "Empty",
    "GradStats",
    "HostRecovery",
    "Kernels",
    "Namespace",
    "Policy",
    "PolicyLike",
    "State",
    "Step",
    "adapter_for_framework",
    "after_restore",
    "after_step",
    "apply",
    "checked_log_every",
    "clip_scale",
    "decide",
    "diagnose_state",
    "flatten",
    "gather",
    "init_state",
    "installed_adapters",
    "inverse_scale",
    "is_legacy",
    "keep_on_skip",
    "layer_names",
    "load_policy",
    "make_record",
    "map_state",
    "monitor_due",
    "namespace",
    "namespace_by_name",
    "raise_if_diverged",
    "raise_recovery_exhausted",
    "read_state",
    "record",
    "step",
    "summarize",
    "telemetry_due",
    "unflatten",
    "unit_scale",
    "upgrade",
    "with_log_every",
]
