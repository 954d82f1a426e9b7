"""The conformance cases of :mod:`safeopt.testing`, run through torch SGD(lr=1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import safeopt
from safeopt.testing import conformance
from safeopt.testing.conformance import CASES, Case


def _run(case: Case, fused: bool) -> tuple[list[np.ndarray], dict]:
    params = [torch.nn.Parameter(torch.from_numpy(a))
              for a in case.arrays("params", layout="out_in")]
    for p, g in zip(params, case.arrays("grads", layout="out_in")):
        p.grad = torch.from_numpy(g)
    inner = torch.optim.SGD(params, lr=1.0, momentum=0.9 if fused else 0.0, fused=fused)
    if fused:
        # The first step of a fused optimizer creates its state and runs on the sync
        # path; a bare step on zero gradients creates it here (momentum buffers of 0,
        # parameters unchanged), so that the wrapped step takes the fused path.
        grads = [p.grad for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p, g in zip(params, grads):
            p.grad = g
    opt = safeopt.wrap(inner, case.policy)
    loss = None if case.loss is None else torch.tensor(case.loss)
    opt.step(loss=loss)
    return [p.detach().numpy() for p in params], safeopt.stats(opt)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, fused: bool) -> None:
    new_params, stats = _run(case, fused)
    assert stats["path"] == ("fused" if fused else "foreach")
    conformance.assert_case(case, new_params, stats, layout="out_in")
