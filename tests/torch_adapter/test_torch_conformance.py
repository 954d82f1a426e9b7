"""The conformance table of :mod:`safeopt.testing`, run through torch SGD(lr=1).

Every case runs on both execution paths (foreach and fused) and with the
decision taken on the host and on the device; every observable output is
compared with the NumPy reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import safeopt
from safeopt.testing import CASES, Case, Trace, check, guarded, snapshot
from safeopt_torch import SafeOptimizer

LAYOUT = "out_in"


def run(case: Case, fused: bool, decide_on: str) -> Trace:
    """Runs ``case`` through a wrapped ``torch.optim.SGD(lr=1)``."""
    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in case.arrays("params", LAYOUT)]
    inner = torch.optim.SGD(list(zip(case.names, params)), lr=1.0, fused=fused or None)
    if fused:
        _create_state(inner, params)
    opt = SafeOptimizer(inner, safeopt.load_policy(case.policy), decide_on=decide_on)
    assert opt.path == ("fused" if fused else "foreach")
    trace: Trace = []
    for update in case.updates:
        weights = case.set_weights([p.detach().numpy() for p in params], update, LAYOUT)
        with torch.no_grad():
            for i in update.weights:
                params[i].copy_(torch.from_numpy(weights[i]))
        for p, g in zip(params, case.grads(update, LAYOUT)):
            p.grad = None if g is None else torch.from_numpy(g)
        loss = None if update.loss is None else torch.tensor(update.loss)
        error = guarded(lambda loss=loss: opt.step(loss=loss), lambda: opt)
        trace.append(snapshot(opt, [_layout(p.detach().numpy()) for p in params], error))
    return trace


def _create_state(inner: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """A fused optimizer's first step creates its state and takes the sync path; a bare step
    on zero gradients (SGD without momentum changes nothing) creates it here."""
    for p in params:
        p.grad = torch.zeros_like(p)
    inner.step()


def _layout(a: np.ndarray) -> np.ndarray:
    return a.T.copy() if a.ndim == 2 else a.copy()


@pytest.mark.parametrize("decide_on", ["host", "device"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, fused: bool, decide_on: str) -> None:
    check(case, run(case, fused, decide_on))
