"""``import safeopt`` after torch leaves the torch adapter to load on first use."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter; fails the test on a non-zero exit."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out


def test_import_safeopt_after_torch_does_not_load_the_torch_adapter() -> None:
    code = ("import sys, torch, safeopt\n"
            "print(sorted(m for m in sys.modules if m.startswith('safeopt_')))\n"
            "opt = safeopt.wrap(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))\n"
            "print('safeopt_torch' in sys.modules)\n")
    out = _python(code)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_adapter_does_not_import_dtensor_for_plain_parameters() -> None:
    # torch.distributed.tensor costs about 0.6 s to import. (torch's own Optimizer
    # constructor imports torch._dynamo, which imports it, so a program that builds an
    # optimizer pays it anyway; the adapter must not add it on its own.)
    code = ("import sys, torch, safeopt_torch\n"
            "from safeopt_torch import _batch\n"
            "p = torch.nn.Parameter(torch.ones(3))\n"
            "p.grad = torch.ones(3)\n"
            "groups = [{'params': [p]}]\n"
            "sharded = _batch.any_dtensor(groups)\n"
            "batch = _batch.collect(groups, torch.device('cpu'), sharded, {})\n"
            "print(sharded, len(batch.grads), _batch.local(p) is p,\n"
            "      'torch.distributed.tensor' in sys.modules)\n")
    out = _python(code)
    assert out.stdout.split() == ["False", "1", "True", "False"]


def test_dtensor_parameters_are_recognised_once_their_module_is_imported() -> None:
    code = ("import sys, torch, safeopt_torch._batch as b\n"
            "p = torch.nn.Parameter(torch.zeros(2))\n"
            "print(b.dtensor_type() is None, b.is_dtensor(p))\n"
            "from torch.distributed.tensor import DTensor\n"
            "print(b.dtensor_type() is DTensor, b.is_dtensor(p))\n")
    out = _python(code)
    assert out.stdout.split("\n")[:2] == ["True False", "True False"]
