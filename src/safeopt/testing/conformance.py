"""The conformance suite: each case described once, run in every framework.

A case is a policy, parameters, gradients (and optionally a loss) and the
expected outcome, worked out by hand: whether the step is skipped, the
gradient the inner optimizer must see, and counters. An adapter's test wraps
plain SGD with learning rate 1 (so ``new = params - effective_grads``), runs
one step of each case in its framework and calls :func:`assert_case`; this
module runs them on the NumPy reference (:func:`reference_step`), the way
torch's ``OptimizerInfo`` drives its optimizer tests.

Two-dimensional arrays are written in the JAX/Keras kernel layout
``(in, out)``; :meth:`Case.arrays` transposes them for torch's ``(out, in)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from safeopt._decide import init_state, protect
from safeopt._policy import Policy, load_policy
from safeopt._registry import summarize
from safeopt._xp import namespace_by_name

Arrays = tuple[tuple[Any, ...], ...]
NAN, INF = math.nan, math.inf


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case.

    Attributes:
      name: Test id.
      policy: Anything :func:`safeopt.load_policy` accepts.
      params: Parameters, one nested list per tensor.
      grads: Gradients, same structure.
      skip: Whether the step must be skipped.
      effective: The gradient the inner optimizer must see (ignored when
        skipped).
      counters: Expected values of some :func:`safeopt.stats` counters after the
        step.
      loss: The loss passed to the step, if any.
    """

    name: str
    policy: Any
    params: Arrays
    grads: Arrays
    skip: bool
    effective: Arrays | None = None
    counters: Mapping[str, int] = dataclasses.field(default_factory=dict)
    loss: float | None = None

    def arrays(self, which: str, layout: str = "in_out",
               dtype: Any = np.float32) -> list[np.ndarray]:
        """Returns ``params``, ``grads`` or ``effective`` as NumPy arrays.

        ``layout="out_in"`` transposes 2-D arrays (torch's weight layout).
        """
        data = getattr(self, which)
        out = [np.asarray(a, dtype=dtype) for a in data]
        if layout == "out_in":
            out = [a.T.copy() if a.ndim == 2 else a for a in out]
        return out

    def expected_params(self, layout: str = "in_out") -> list[np.ndarray]:
        """The parameters after one SGD(lr=1) step under this case."""
        params = self.arrays("params", layout)
        if self.skip:
            return params
        return [p - g for p, g in zip(params, self.arrays("effective", layout))]

    @property
    def unit_axis(self) -> int:
        """Output-unit axis in the default layout."""
        return -1


def _c(name: str, policy: Any, params: Arrays, grads: Arrays, skip: bool = False,
       effective: Arrays | None = None, counters: Mapping[str, int] | None = None,
       loss: float | None = None) -> Case:
    return Case(name, policy, params, grads, skip, effective, dict(counters or {}), loss)


#: The cases, described once.
CASES: tuple[Case, ...] = (
    _c("global_norm_clipped", {"clip_norm": 1.0},
       params=((0.0, 0.0), (0.0, 0.0)), grads=((3.0, 0.0), (0.0, 4.0)),
       effective=((0.6, 0.0), (0.0, 0.8)),
       counters={"norm_clips": 1, "skips": 0, "steps": 1}),
    _c("global_norm_below_threshold", {"clip_norm": 10.0},
       params=((1.0, 1.0), (1.0,)), grads=((3.0, 0.0), (4.0,)),
       effective=((3.0, 0.0), (4.0,)), counters={"norm_clips": 0, "steps": 1}),
    _c("per_tensor_norm", {"clip_norm": 1.0, "norm_scope": "per_tensor"},
       params=((0.0, 0.0), (0.0, 0.0)), grads=((3.0, 4.0), (0.3, 0.4)),
       effective=((0.6, 0.8), (0.3, 0.4)), counters={"norm_clips": 1}),
    _c("value_clip", {"clip_norm": None, "clip_value": 0.5},
       params=((0.0, 0.0, 0.0),), grads=((1.0, -2.0, 0.25),),
       effective=((0.5, -0.5, 0.25),), counters={"value_clips": 1, "norm_clips": 0}),
    _c("value_clip_then_norm_clip", {"clip_norm": 0.5, "clip_value": 0.5},
       params=((0.0, 0.0, 0.0, 0.0),), grads=((1.0, -1.0, 1.0, -1.0),),
       effective=((0.25, -0.25, 0.25, -0.25),), counters={"value_clips": 1, "norm_clips": 1}),
    _c("nan_skips", {"clip_norm": 1.0},
       params=((1.0, 2.0), (3.0,)), grads=((NAN, 0.0), (1.0,)), skip=True,
       counters={"skips": 1, "nonfinite": 1, "steps": 0, "norm_clips": 0}),
    _c("inf_skips", {"clip_norm": 1.0, "clip_value": 0.5},
       params=((1.0, 2.0), (3.0,)), grads=((0.0, 0.0), (-INF,)), skip=True,
       counters={"skips": 1, "nonfinite": 1, "value_clips": 0}),
    _c("nan_loss_skips", {"clip_norm": 1.0},
       params=((1.0,),), grads=((0.5,),), loss=NAN, skip=True, counters={"skips": 1}),
    _c("nonfinite_applied_when_not_skipping", {"clip_norm": None, "skip_nonfinite": False},
       params=((1.0, 2.0),), grads=((NAN, 1.0),),
       effective=((NAN, 1.0),), counters={"skips": 0, "nonfinite": 1, "steps": 1}),
    _c("l2_penalty", {"clip_norm": None, "l2": 0.5},
       params=((1.0, 2.0),), grads=((0.1, 0.1),), effective=((1.1, 2.1),)),
    _c("l1_penalty", {"clip_norm": None, "l1": 0.1},
       params=((1.0, -2.0, 0.0),), grads=((0.0, 0.0, 0.0),), effective=((0.1, -0.1, 0.0),)),
    _c("penalty_then_norm_clip", {"clip_norm": 1.0, "l2": 0.5},
       params=((3.0, 4.0),), grads=((0.0, 0.0),), effective=((0.6, 0.8),),
       counters={"norm_clips": 1}),
    _c("unitwise_vector", {"clip_norm": 0.01, "norm_scope": "unitwise"},
       params=((3.0, 4.0),), grads=((0.3, 0.4),), effective=((0.03, 0.04),),
       counters={"norm_clips": 1}),
    _c("unitwise_kernel", {"clip_norm": 0.01, "norm_scope": "unitwise"},
       params=(((1.0, 0.0), (0.0, 2.0)),), grads=(((0.1, 0.0), (0.0, 0.1)),),
       effective=(((0.01, 0.0), (0.0, 0.02)),), counters={"norm_clips": 1}),
    _c("unitwise_below_threshold", {"clip_norm": 1.0, "norm_scope": "unitwise"},
       params=(((1.0, 0.0), (0.0, 2.0)),), grads=(((0.1, 0.0), (0.0, 0.1)),),
       effective=(((0.1, 0.0), (0.0, 0.1)),), counters={"norm_clips": 0}),
    _c("off_passes_nan_through", "off",
       params=((1.0, 2.0),), grads=((NAN, 100.0),), effective=((NAN, 100.0),)),
    _c("off_leaves_large_gradients", "off",
       params=((1.0, 2.0),), grads=((300.0, -400.0),), effective=((300.0, -400.0),)),
)


def reference_step(case: Case) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Runs ``case`` through the NumPy reference: ``(new_params, stats)``."""
    xp = namespace_by_name("numpy")
    policy = load_policy(case.policy)
    params = case.arrays("params")
    grads = case.arrays("grads")
    state = init_state(xp, policy)
    loss = None if case.loss is None else np.float32(case.loss)
    new_grads, decision, state = protect(
        xp, policy, state, grads, params if policy.needs_params else None, loss=loss,
        unit_axis=case.unit_axis,
    )
    if bool(decision.skip):
        return params, summarize(policy, state)
    return [p - g for p, g in zip(params, new_grads)], summarize(policy, state)


def assert_case(case: Case, new_params: Sequence[Any], stats: Mapping[str, Any] | None = None,
                layout: str = "in_out", rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Asserts that a framework's result for ``case`` is the expected one.

    Args:
      case: The case that was run.
      new_params: The parameters after one step, as arrays NumPy can read.
      stats: :func:`safeopt.stats` of the wrapped optimizer after the step.
      layout: The layout the framework used (``"out_in"`` for torch).
      rtol: Relative tolerance.
      atol: Absolute tolerance.
    """
    expected = case.expected_params(layout)
    assert len(new_params) == len(expected), case.name
    for got, want in zip(new_params, expected):
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol,
                                   atol=atol, equal_nan=True, err_msg=case.name)
    for key, value in case.counters.items():
        assert stats is not None, case.name
        assert stats[key] == value, f"{case.name}: stats[{key!r}]={stats[key]} != {value}"


def policy_of(case: Case) -> Policy:
    """The case's policy, validated."""
    return load_policy(case.policy)
