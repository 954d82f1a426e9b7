"""The wrapper is a drop-in for every ``torch.optim`` optimizer, on torch's own catalogue.

Every optimizer of ``optim_db``, every CPU implementation (forloop, foreach,
fused, differentiable) and a sample of its input variants (all of them with
``SAFEOPT_OPTIM_DB=all``; see :mod:`optim_db_cases`), in the spirit of torch's
``test/test_optim.py``: wrapped with ``"off"`` and with a policy that never
triggers (decided on the host and on the device), the wrapper must leave
trajectories, LR schedules, state dicts, copies, pickles and hooks exactly as
the bare optimizer has them (closures: test_torch_optim_db_closures.py). A
case is skipped only where torch's own tests skip it, with torch's reason.
"""

from __future__ import annotations

import copy
import pickle

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
    error_inputs,
    non_leaf,
    params_of,
    schedulers_of,
    skip_unless_runnable,
    twins,
)
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import safeopt
from safeopt_torch import SafeOptimizer

CASES = cases()
FIRST = [c for c in CASES if c.index == 0]  # each optimizer and implementation once
STEPS = 6


# -- trajectories ----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", list(NEVER))
@pytest.mark.parametrize("case", params_of(CASES))
def test_trajectory_with_a_scheduler_is_bit_identical(case: Case, policy: str) -> None:
    skip_unless_runnable(case)
    bare, bare_problem, opt, problem = twins(case, policy)
    none_at = None if case.info.step_requires_closure else 3
    steps = 3 if case.info.step_requires_closure else STEPS
    losses = drive(case, bare, bare_problem, steps, [s(bare) for s in schedulers_of(case)], none_at)
    got = drive(case, opt, problem, steps, [s(opt) for s in schedulers_of(case)], none_at)
    assert_same(losses, got, "losses")
    assert_twins(bare, bare_problem, opt, problem)
    assert opt.path == ("fused" if case.impl == "fused" else "foreach")
    stats = safeopt.stats(opt)
    assert (stats["skips"], stats["norm_clips"]) == (0, 0)
    assert stats["steps"] == steps - (none_at is not None)


@pytest.mark.parametrize("policy", ["never-host", "never-device"])
@pytest.mark.parametrize("case", params_of([c for c in CASES if c.info.supports_complex]))
def test_complex_parameters_match_the_bare_optimizer(case: Case, policy: str) -> None:
    skip_unless_runnable(case, "differentiable", "fused_complex")
    bare, bare_problem, opt, problem = twins(case, policy, complex_=True)
    steps = 3 if case.info.step_requires_closure else STEPS
    drive(case, bare, bare_problem, steps)
    drive(case, opt, problem, steps)
    assert_twins(bare, bare_problem, opt, problem)


CLIPPING = {"global": {"clip_norm": 0.5}, "l2": {"clip_norm": None, "l2": 0.01},
            "per_tensor": {"clip_norm": 0.5, "norm_scope": "per_tensor"}}


@pytest.mark.parametrize("policy", list(CLIPPING))
@pytest.mark.parametrize("case", params_of([c for c in FIRST if c.info.supports_complex]))
def test_complex_parameters_clip_as_their_real_view(case: Case, policy: str) -> None:
    """torch's test_complex, under a clipping policy: ``|z|`` norms are those of view_as_real.

    (A complex vector is one unit for ``unitwise``, its real view one unit
    per element: see test_complex_kernels for that scope.)
    """
    skip_unless_runnable(case, "differentiable", "fused_complex")
    problem = Problem(case, complex_=True)
    real = problem.clone()
    real.params = [torch.view_as_real(p.detach()).clone().requires_grad_() if p.is_complex()
                   else p.detach().clone().requires_grad_() for p in problem.params]
    real.targets = [torch.view_as_real(t) if t.is_complex() else t for t in problem.targets]
    opt = case.wrap(problem.params, CLIPPING[policy], "host")
    opt_real = case.wrap(real.params, CLIPPING[policy], "host")
    steps = 3 if case.info.step_requires_closure else STEPS
    drive(case, opt, problem, steps)
    drive(case, opt_real, real, steps)
    tol = {"rtol": 4.5e-5, "atol": 5e-5} if case.info.step_requires_closure else {}
    for p, r in zip(problem.params, real.params):
        torch.testing.assert_close(torch.view_as_real(p) if p.is_complex() else p, r, **tol)
    stats, stats_real = safeopt.stats(opt), safeopt.stats(opt_real)
    acted = (stats["norm_clips"], stats["skips"])  # LBFGS clipped at every evaluation may diverge
    assert acted == (stats_real["norm_clips"], stats_real["skips"])
    assert sum(acted) > 0 or CLIPPING[policy]["clip_norm"] is None


# -- state dicts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", params_of(CASES))
def test_state_dict_round_trips_both_ways(case: Case) -> None:
    skip_unless_runnable(case, "differentiable")
    spec, decide_on = NEVER["never-host"]
    problem = Problem(case)
    opt = case.wrap(problem.params, spec, decide_on)
    drive(case, opt, problem, 3)
    at_save = problem.clone()
    saved = copy.deepcopy(opt.state_dict())  # the state dict refers to the live state
    kept = copy.deepcopy(saved)
    drive(case, opt, problem, 3)
    for make in (lambda ps: case.make(ps), lambda ps: case.wrap(ps, spec, decide_on)):
        other = at_save.clone()
        loaded = make(other.params)
        loaded.load_state_dict(copy.deepcopy(saved))
        drive(case, loaded, other, 3)
        assert_twins(opt, problem, loaded, other)
        if isinstance(loaded, SafeOptimizer):  # safeopt's own state went on alike
            assert_same(opt.state_dict()["param_groups"][0]["safeopt"],
                        loaded.state_dict()["param_groups"][0]["safeopt"], "safeopt")
    assert_same(saved, kept, "state dict after loading")
    # bare -> wrapped
    bare_problem = at_save.clone()
    bare = case.make(bare_problem.params)
    bare.load_state_dict(copy.deepcopy(saved))
    into = at_save.clone()
    wrapped = case.wrap(into.params, spec, decide_on)
    wrapped.load_state_dict(copy.deepcopy(bare.state_dict()))  # loading shares tensors
    drive(case, bare, bare_problem, 3)
    drive(case, wrapped, into, 3)
    assert_twins(bare, bare_problem, wrapped, into)


@pytest.mark.parametrize("case", params_of(CASES))
def test_an_older_state_dict_loads_and_the_next_step_clips(case: Case) -> None:
    """torch's test_can_load_older_state_dict: the flags added since release are dropped.

    Dropping ``fused`` makes the inner optimizer non-fused: the wrapper must
    leave the fused path with it, also on a step that clips.
    """
    skip_unless_runnable(case, "differentiable")
    bare, bare_problem, opt, problem = twins(case, "never-device")
    clipped_problem = problem.clone()
    clipping = case.wrap(clipped_problem.params, {"clip_norm": 1e-3})
    for o, prob in ((bare, bare_problem), (opt, problem), (clipping, clipped_problem)):
        drive(case, o, prob, 3)
        older = copy.deepcopy(o.state_dict())
        for group in older["param_groups"]:
            for flag in case.info.not_og_supported_flags:
                group.pop(flag, None)
        o.load_state_dict(older)
    fused = bool(bare.param_groups[0].get("fused"))
    assert (opt.path, clipping.path) == ("fused" if fused else "foreach",) * 2
    for o, prob in ((bare, bare_problem), (opt, problem), (clipping, clipped_problem)):
        prob.poison[prob.evaluations] = 1e3  # a gradient the next step clips
        drive(case, o, prob, 2)
    assert_twins(bare, bare_problem, opt, problem)
    assert safeopt.stats(clipping)["norm_clips"] >= 1


# -- copies ----------------------------------------------------------------------------------------
def _public(obj: object) -> set[str]:
    return {k for k in obj.__dict__ if not k.startswith("_")}


def _stepped_copy(case: Case, opt: torch.optim.Optimizer, problem: Problem,
                  clone: object) -> tuple[torch.optim.Optimizer, Problem, str | None]:
    """``clone(opt)`` stepped twice on its own parameters, and the error that stopped it."""
    copied = clone(opt)
    mine = problem.clone()
    mine.params = [p for group in copied.param_groups for p in group["params"]]
    try:
        drive(case, copied, mine, 2)
    except Exception as e:  # a bare LBFGS copy cannot step: its `_params` are not copied
        return copied, mine, f"{type(e).__name__}: {e}"
    return copied, mine, None


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("case", params_of(CASES))
def test_a_copy_with_a_scheduler_attached_is_independent(case: Case, how: str) -> None:
    skip_unless_runnable(case, "differentiable")
    clone = copy.deepcopy if how == "deepcopy" else lambda o: pickle.loads(pickle.dumps(o))
    bare, bare_problem, opt, problem = twins(case, "never-host")
    assert _public(clone(opt)) == _public(opt)  # torch's test_deepcopy_copies_all_public_attrs
    schedulers = [s(opt) for s in schedulers_of(case)]
    bare_schedulers = [s(bare) for s in schedulers_of(case)]
    drive(case, bare, bare_problem, 2, bare_schedulers)
    drive(case, opt, problem, 2, schedulers)
    before = [p.detach().clone() for p in problem.params]
    copied, mine, error = _stepped_copy(case, opt, problem, clone)
    bare_copied, bare_mine, bare_error = _stepped_copy(case, bare, bare_problem, clone)
    assert_same(before, [p.detach() for p in problem.params], "original after the copy stepped")
    assert error == bare_error
    assert_twins(bare_copied, bare_mine, copied, mine)
    assert copied.inner is copied._run.inner and copied.inner is not opt.inner
    drive(case, bare, bare_problem, 2, bare_schedulers)  # the original goes on as before
    drive(case, opt, problem, 2, schedulers)
    assert_twins(bare, bare_problem, opt, problem)


# -- hooks, parameter groups, tensor lr ------------------------------------------------------------
@pytest.mark.parametrize("case", params_of(CASES))
def test_global_and_local_step_hooks_fire_once(case: Case) -> None:
    """torch's test_step_all_hooks: ``[0, 1, 2, 5]`` per step; the inner's own hooks once."""
    skip_unless_runnable(case)
    problem = Problem(case)
    opt = case.wrap(problem.params, NEVER["never-host"][0])
    other = torch.optim.SGD([torch.zeros(2, 2, requires_grad=True)])
    data: list[int] = []
    inner_calls: list[str] = []
    opt.inner.register_step_pre_hook(lambda *a: inner_calls.append("pre"))
    opt.inner.register_step_post_hook(lambda *a: inner_calls.append("post"))
    handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
               register_optimizer_step_post_hook(lambda *a: data.append(5))]
    try:
        for o in (opt, other):
            handles.append(o.register_step_pre_hook(lambda *a: data.append(1)))
            handles.append(o.register_step_post_hook(lambda *a: data.append(2)))

        def step(o: torch.optim.Optimizer) -> None:
            if o is other:
                o.step()
            elif case.info.step_requires_closure:
                o.step(lambda: problem.closure(zero=True))
            else:
                problem.closure()
                o.step()

        step(opt)
        assert data == [0, 1, 2, 5]
        step(other)
        assert data == [0, 1, 2, 5] * 2
        step(opt)
        assert data == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    step(opt)
    step(other)
    assert data == [0, 1, 2, 5] * 3
    assert inner_calls == ["pre", "post"] * 3


@pytest.mark.parametrize("policy", ["never-host", "never-device"])
@pytest.mark.parametrize("case", params_of(CASES))
def test_add_param_group_mid_run(case: Case, policy: str) -> None:
    skip_unless_runnable(case, "param_groups")
    bare, bare_problem, opt, problem = twins(case, policy)
    drive(case, bare, bare_problem, 2)
    drive(case, opt, problem, 2)
    lr = case.kwargs().get("lr", 1e-3)
    for o, prob in ((bare, bare_problem), (opt, problem)):
        extra = torch.ones(3, 2) if case.name == "Muon" else torch.ones(3)
        extra = non_leaf(extra) if case.impl == "differentiable" else extra.requires_grad_()
        o.add_param_group({"params": [extra], "lr": lr * 2})
        prob.params.append(extra)
        prob.targets.append(torch.full_like(extra, -1.0))
        prob.weights.append(1.5)
    drive(case, bare, bare_problem, 3)
    drive(case, opt, problem, 3)
    assert_twins(bare, bare_problem, opt, problem)


@pytest.mark.parametrize("case", params_of(FIRST))
def test_tensor_lr(case: Case) -> None:
    """torch's test_tensor_lr: a tensor lr, wrapped, follows the bare optimizer."""
    skip_unless_runnable(case, "differentiable")
    bare_problem = Problem(case)
    problem = bare_problem.clone()
    lr = torch.tensor(1.0 if case.info.step_requires_closure else 1e-3)
    try:
        bare = case.make(bare_problem.params, lr=lr.clone())
    except ValueError as e:  # torch's test goes on to the next input
        pytest.skip(f"torch: {e}")
    opt = case.wrap(problem.params, NEVER["never-device"][0], "device", lr=lr.clone())
    drive(case, bare, bare_problem, 4, [s(bare) for s in schedulers_of(case)])
    drive(case, opt, problem, 4, [s(opt) for s in schedulers_of(case)])
    assert_twins(bare, bare_problem, opt, problem)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("info", "error"), list(error_inputs()))
def test_the_inner_optimizers_step_errors_come_through(info: object, error: object) -> None:
    """torch's test_errors, for the errors raised at ``step``."""
    inputs = error.optimizer_error_input
    opt = safeopt.wrap(info.optim_cls(inputs.params, **inputs.kwargs), {"clip_norm": 1e30})
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            opt.step()
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            opt.step()


@pytest.mark.parametrize("case", params_of([c for c in FIRST if c.sparse_only]))
def test_sparse_gradients_are_refused_and_dense_ones_get_the_inner_error(case: Case) -> None:
    p = torch.randn(4, 3, requires_grad=True)
    opt = case.wrap([p], {})
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    p.grad = p.grad.to_dense()
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        opt.step()
