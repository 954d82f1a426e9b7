"""``step(closure)`` through the wrapper, on torch's optimizer catalogue (see test_torch_optim_db).

Every optimizer returns the same loss and takes the same trajectory as the
bare one; a non-finite first evaluation skips the step; ``LBFGS`` (and any
optimizer that evaluates its closure again) gets the policy on every
evaluation, and a non-finite later evaluation abandons the step as if it
never happened.
"""

from __future__ import annotations

import pytest
import torch
from optim_db_cases import (
    NEVER,
    Case,
    Problem,
    assert_same,
    assert_twins,
    cases,
    drive,
    frozen,
    inner_state,
    params_of,
    skip_unless_runnable,
    twins,
)

import safeopt
from safeopt_torch import SafeOptimizer

CASES = cases()
FIRST = [c for c in CASES if c.index == 0]  # each optimizer and implementation once
LBFGS = [c for c in CASES if c.info.step_requires_closure]


@pytest.mark.parametrize("policy", list(NEVER))
@pytest.mark.parametrize("case", params_of(CASES))
def test_step_with_a_closure(case: Case, policy: str) -> None:
    skip_unless_runnable(case)
    bare, bare_problem, opt, problem = twins(case, policy)
    for _ in range(3):
        got = opt.step(lambda: problem.closure(zero=True))
        want = bare.step(lambda: bare_problem.closure(zero=True))
        assert_same(want, got, "loss")
    assert problem.evaluations == bare_problem.evaluations
    assert_twins(bare, bare_problem, opt, problem)


@pytest.mark.parametrize("policy", ["never-host", "never-device"])
@pytest.mark.parametrize("case", params_of(FIRST))
def test_a_nonfinite_first_evaluation_skips_the_step(case: Case, policy: str) -> None:
    skip_unless_runnable(case)
    problem = Problem(case)
    opt = case.wrap(problem.params, *NEVER[policy])
    drive(case, opt, problem, 2)
    params, state = frozen(problem.params), frozen(inner_state(opt))
    evaluations = problem.evaluations
    problem.poison[evaluations] = float("nan")
    loss = opt.step(lambda: problem.closure(zero=True))
    assert loss.isnan() and problem.evaluations == evaluations + 1  # the inner step never ran
    assert_same(params, [p.detach() for p in problem.params], "params")
    assert_same(state, inner_state(opt), "state")
    assert safeopt.stats(opt)["skips"] == 1


@pytest.mark.parametrize("case", params_of([c for c in LBFGS if c.impl == "only"]))
def test_lbfgs_without_a_closure_raises_its_own_error(case: Case) -> None:
    problem = Problem(case)
    with pytest.raises(TypeError) as bare_error:
        case.make(problem.clone().params).step()
    opt = case.wrap(problem.params, {})
    with pytest.raises(TypeError, match="closure") as error:
        opt.step()
    assert str(error.value) == str(bare_error.value)
    assert safeopt.stats(opt)["steps"] == 0


@pytest.mark.parametrize("decide_on", ["host", "device"])
@pytest.mark.parametrize("case", params_of(LBFGS))
def test_lbfgs_every_evaluation_follows_the_policy(case: Case, decide_on: str) -> None:
    problem = Problem(case)
    opt = case.wrap(problem.params, {"clip_norm": 0.25}, decide_on)
    seen: list[float] = []
    gather = opt.inner._gather_flat_grad

    def spy() -> torch.Tensor:
        flat = gather()
        seen.append(float(flat.norm()))
        return flat

    opt.inner._gather_flat_grad = spy
    opt.step(lambda: problem.closure(zero=True))
    assert len(seen) > 1 and problem.evaluations == len(seen)
    assert max(seen) <= 0.25 * (1 + 1e-5)
    assert safeopt.stats(opt)["steps"] == 1  # the state advances once per step


@pytest.mark.parametrize("decide_on", ["host", "device"])
@pytest.mark.parametrize("case", params_of(LBFGS))
def test_lbfgs_a_nonfinite_later_evaluation_abandons_the_step(case: Case, decide_on: str) -> None:
    problem = Problem(case)
    ref_problem = problem.clone()
    opt = case.wrap(problem.params, {"clip_norm": 1e30}, decide_on)
    ref = case.make(ref_problem.params)
    params = frozen(problem.params)
    problem.poison[2] = float("inf")  # LBFGS's second re-evaluation
    loss = opt.step(lambda: problem.closure(zero=True))
    assert problem.evaluations == 3 and torch.isfinite(loss)
    assert_same(params, frozen(problem.params), "params")
    assert_same([{}] * len(params), inner_state(opt), "state")
    stats = safeopt.stats(opt)
    assert (stats["steps"], stats["skips"], stats["nonfinite"]) == (0, 1, 1)
    for _ in range(2):  # it never happened
        for o, p in ((opt, problem), (ref, ref_problem)):
            o.step(lambda p=p: p.closure(zero=True))
    assert_twins(ref, ref_problem, opt, problem)


class _LookTwice(torch.optim.SGD):
    """A third-party optimizer whose optional closure is evaluated again after the update."""

    def step(self, closure=None):  # type: ignore[override]
        loss = closure()
        super().step()
        closure()
        return loss


@pytest.mark.parametrize("decide_on", ["host", "device"])
def test_a_third_party_optimizer_that_reevaluates_is_protected_too(decide_on: str) -> None:
    params = [torch.ones(3, requires_grad=True)]
    evaluations: list[torch.Tensor] = []

    def closure(value: float = 10.0) -> torch.Tensor:
        params[0].grad = torch.full((3,), value)
        evaluations.append(params[0].detach().clone())
        return torch.tensor(value)

    opt = SafeOptimizer(_LookTwice(params, lr=0.1), safeopt.load_policy({"clip_norm": 1.0}),
                        decide_on=decide_on)
    opt.step(closure)
    assert len(evaluations) == 2  # once by the wrapper, once by the optimizer
    assert torch.allclose(params[0].grad.norm(), torch.tensor(1.0))  # clipped again
    after = params[0].detach().clone()
    torch.testing.assert_close(after, torch.full((3,), 1 - 0.1 / 3 ** 0.5))
    opt.step(lambda: closure(float("nan")) if len(evaluations) == 3 else closure())
    assert len(evaluations) == 4
    assert torch.equal(params[0].detach(), after)  # the update was rolled back
    assert safeopt.stats(opt)["skips"] == 1
