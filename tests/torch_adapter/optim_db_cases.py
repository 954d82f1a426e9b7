"""torch's optimizer catalogue (``optim_db``) as cases for the wrapper, and a problem for them.

A :class:`Case` is one optimizer of ``torch.testing._internal.common_optimizers.optim_db``,
one CPU implementation (``forloop``, ``foreach``, ``fused``, ``differentiable``,
or ``only`` for optimizers without implementation flags) and one input variant
(the constructor keywords of ``optim_inputs_func``). :func:`cases` returns
every CPU implementation of every optimizer with a sample of the input
variants: the default one on every implementation, and the others in turn
on one implementation each (every variant of an optimizer with two or more
implementations, every other one of ``LBFGS``, ``Muon`` and ``SparseAdam``);
with ``SAFEOPT_OPTIM_DB=all`` it returns the whole catalogue.

A :class:`Problem` is a quadratic objective over a few parameters (a
matrix, a vector, a 0-d and an empty tensor; complex ones on request) whose
gradients are written in closed form, as autograd would accumulate them,
so the same step sequence (:func:`drive`) runs on a bare and on a wrapped
optimizer (:func:`twins`), compared bit for bit (:func:`assert_twins`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

if not os.environ.get("SAFEOPT_OPTIM_DB_REQUIRED"):  # set in tox's torch environment
    pytest.importorskip("expecttest", reason="torch's optim_db imports `expecttest`: "
                        "pip install -c constraints.txt expecttest")

from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    OptimizerInfo,
    optim_db,
)

import safeopt
from safeopt_torch import SafeOptimizer

#: Reasons torch itself gives for leaving a case out (common_optimizers.py, test_optim.py).
TORCH_SKIPS = {
    "differentiable": "torch: Skip differentiable testing for now, see "
                      "https://github.com/pytorch/pytorch/issues/116490",
    "param_groups": "torch: Does not support param groups",
    "fused_complex": "torch: Also skip fused, since our fused kernels do not support complex",
    "dense": "torch: SparseAdam does not support dense gradients, see "
             "https://github.com/pytorch/pytorch/issues/116507",
}
#: Policies that never change an update, and where their decisions are taken.
NEVER = {"off": ("off", "auto"), "never-host": ({"clip_norm": 1e30}, "host"),
         "never-device": ({"clip_norm": 1e30}, "device")}


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer, one CPU implementation, one input variant of ``optim_db``."""

    info: OptimizerInfo
    impl: str
    index: int
    desc: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def id(self) -> str:
        return f"{self.name}-{self.impl}-{self.desc}".replace(" ", "_").replace(",", "")

    @property
    def sparse_only(self) -> bool:
        return self.info.only_supports_sparse_grads

    def kwargs(self, **changes: Any) -> dict[str, Any]:
        """The constructor keywords: the variant's (fresh: a tensor lr is not shared), the flags."""
        kwargs = copy.deepcopy(self.info.optim_inputs_func(device="cpu")[self.index].kwargs)
        for flag in ("foreach", "fused", "differentiable"):
            if flag in self.info.supported_impls:
                kwargs[flag] = flag == self.impl
        kwargs.update(changes)
        return kwargs

    def make(self, params: Any, **changes: Any) -> torch.optim.Optimizer:
        """A bare optimizer of this case over ``params``."""
        return self.info.optim_cls(params, **self.kwargs(**changes))

    def wrap(self, params: Any, policy: Any, decide_on: str = "auto",
             **changes: Any) -> SafeOptimizer:
        """A wrapped optimizer of this case over ``params`` (``safeopt.wrap`` for ``"auto"``)."""
        inner = self.make(params, **changes)
        if decide_on == "auto":
            return safeopt.wrap(inner, policy)
        return SafeOptimizer(inner, safeopt.load_policy(policy), decide_on=decide_on)


def _impls(info: OptimizerInfo) -> list[str]:
    """The CPU implementations of ``info``: the flags it supports, one at a time."""
    flags = [f for f in ("foreach", "fused", "differentiable") if f in info.supported_impls
             and (f != "fused" or "cpu" in info.supports_fused_on)]
    return ["forloop", *flags] if flags else ["only"]


def cases(sample: bool | None = None) -> list[Case]:
    """Every optimizer and CPU implementation, with all or a sample of the input variants."""
    if sample is None:
        sample = os.environ.get("SAFEOPT_OPTIM_DB", "sample") != "all"
    out = []
    for info in optim_db:
        inputs = info.optim_inputs_func(device="cpu")
        impls = _impls(info)
        for j, impl in enumerate(impls):
            for i, optim_input in enumerate(inputs):
                if not sample or i == 0 or i % max(len(impls), 2) == j:
                    out.append(Case(info, impl, i, optim_input.desc))
    return out


def params_of(case_ids: list[Case]) -> list[Any]:
    """``pytest.param`` of each case, with its id."""
    return [pytest.param(c, id=c.id) for c in case_ids]


def error_inputs() -> Iterator[Any]:
    """``(optimizer info, error input)`` of every error torch expects at ``step``."""
    for info in optim_db:
        if info.optim_error_inputs_func is None:
            continue
        for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            if error.error_on == OptimizerErrorEnum.STEP_ERROR:
                desc = error.optimizer_error_input.desc
                yield pytest.param(info, error, id=f"{info.name}-{desc}")


class Problem:
    """A weighted quadratic ``sum(c * |p - t|**2)`` with its gradients written in closed form.

    Args:
      case: The case (Muon takes matrices only, Adafactor no empty tensor,
        ``differentiable`` non-leaf parameters as torch's own tests use).
      seed: Parameters, targets and weights.
      complex_: Make the matrix and the vector complex64 (torch's test_complex:
        the last parameter stays real).
    """

    def __init__(self, case: Case, seed: int = 0, complex_: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        shapes: list[tuple[int, ...]] = [(4, 3), (2, 4)] if case.name == "Muon" else \
            [(4, 3), (4,), (2, 4), ()] + ([] if case.name == "Adafactor" else [(0,)])
        dtypes = [torch.complex64 if complex_ and i < 2 else torch.float32
                  for i in range(len(shapes))]
        leaves = [torch.randn(s, generator=gen, dtype=d) for s, d in zip(shapes, dtypes)]
        self.targets = [torch.randn(s, generator=gen, dtype=d) for s, d in zip(shapes, dtypes)]
        self.weights = [0.5 + torch.rand((), generator=gen).item() for _ in shapes]
        if case.impl == "differentiable":  # torch's differentiable optimizers update non-leaves
            self.params = [non_leaf(p) for p in leaves]
        else:
            self.params = [p.requires_grad_() for p in leaves]
        self.evaluations = 0
        self.poison: dict[int, float] = {}  # evaluation index -> value written into a gradient

    def clone(self) -> Problem:
        """The same problem over copies of the current parameters."""
        other = copy.copy(self)
        other.params = [p.detach().clone().requires_grad_() if p.is_leaf else
                        non_leaf(p.detach().clone()) for p in self.params]
        other.evaluations = 0
        other.poison = {}
        return other

    def closure(self, zero: bool = False) -> Tensor:
        """Accumulates the gradients into ``.grad`` (as ``backward`` does); returns the loss.

        ``zero`` first sets every gradient to ``None``, as a closure that
        calls ``zero_grad`` does (one for ``LBFGS``).
        """
        loss = torch.zeros((), dtype=torch.float32)
        with torch.no_grad():
            for p, t, c in zip(self.params, self.targets, self.weights):
                if zero:
                    p.grad = None
                d = p.detach() - t
                loss += c * (d.abs() ** 2).sum()
                g = 2.0 * c * d
                p.grad = g if p.grad is None else p.grad.add_(g)
            value = self.poison.get(self.evaluations)
            if value is not None:
                self.params[0].grad.view(-1)[1] = value
                loss.fill_(value)
        self.evaluations += 1
        return loss


def non_leaf(t: Tensor) -> Tensor:
    """A non-leaf copy of ``t`` that keeps its ``.grad`` (what differentiable optimizers update)."""
    out = t.requires_grad_().clone()
    out.retain_grad()
    return out


def drive(case: Case, opt: torch.optim.Optimizer, problem: Problem, steps: int,
          schedulers: list[Any] = (), none_at: int | None = None,
          after: Callable[[int], None] | None = None) -> list[Any]:
    """Runs ``steps`` steps as torch's tests do; returns what each ``step`` returned.

    ``zero_grad`` alternates ``set_to_none``; at step ``none_at`` no gradient
    is computed (every ``.grad`` is ``None``: a no-op step, torch's
    ``_test_derived_optimizers``); an optimizer that requires a closure gets
    one, the others are stepped after calling it.
    """
    out = []
    for i in range(steps):
        opt.zero_grad(set_to_none=i % 2 == 0 or i == none_at)
        if case.info.step_requires_closure:
            loss = opt.step(lambda: problem.closure(zero=True))
        else:
            loss = problem.closure() if i != none_at else None
            out_step = opt.step()
            assert out_step is None
        out.append(loss)
        for s in schedulers:
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s.step(math.inf if loss is None else float(loss))
            else:
                s.step()
        if after is not None:
            after(i)
    return out


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` are equal bit for bit (NaN equal to NaN), through containers."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), where
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b)
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), (where, a, b)
    else:
        assert a == b, (where, a, b)


def frozen(value: Any) -> Any:
    """A detached copy of ``value``'s tensors, through dicts, lists and tuples."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(frozen(v) for v in value)
    return value


def inner_state(opt: torch.optim.Optimizer) -> Any:
    """The per-parameter state in parameter order (the wrapper's is the inner one's)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return [dict(opt.state.get(p, {})) for p in params]


def skip_unless_runnable(case: Case, *also: str) -> None:
    """Skips, with torch's reason, what torch's tests skip."""
    if case.sparse_only:
        pytest.skip(TORCH_SKIPS["dense"])
    if "differentiable" in also and case.impl == "differentiable":
        pytest.skip(TORCH_SKIPS["differentiable"])
    if "param_groups" in also and not case.info.supports_param_groups:
        pytest.skip(TORCH_SKIPS["param_groups"])
    if "fused_complex" in also and case.impl == "fused":
        pytest.skip(TORCH_SKIPS["fused_complex"])


def schedulers_of(case: Case) -> list[Any]:
    """One of the case's LR scheduler combinations (``scheduler_inputs``), by variant."""
    options = case.info.scheduler_inputs
    return list(options[case.index % len(options)])


def twins(case: Case, policy: str, **problem_kw: Any) -> tuple[Any, Problem, Any, Problem]:
    """A bare and a wrapped optimizer of ``case`` on two copies of one problem."""
    bare_problem = Problem(case, **problem_kw)
    problem = bare_problem.clone()
    spec, decide_on = NEVER[policy]
    return (case.make(bare_problem.params), bare_problem,
            case.wrap(problem.params, spec, decide_on), problem)


def assert_twins(bare: torch.optim.Optimizer, bare_problem: Problem,
                 opt: torch.optim.Optimizer, problem: Problem) -> None:
    """Parameters, per-parameter state and group settings are equal bit for bit."""
    assert_same(bare_problem.params, problem.params, "params")
    assert_same(inner_state(bare), inner_state(opt), "state")
    assert_same(group_settings(bare.param_groups), group_settings(opt.param_groups),
                "param_groups")


def group_settings(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups' settings, less ``params`` and the wrapper's checkpoint key (``"safeopt"``)."""
    return [{k: v for k, v in g.items() if k not in ("params", "safeopt")} for g in groups]
