"""``import safeopt`` after torch leaves the torch adapter to load on first use."""

from __future__ import annotations

import subprocess
import sys


def test_import_safeopt_after_torch_does_not_load_the_torch_adapter() -> None:
    code = ("import sys, torch, safeopt\n"
            "print(sorted(m for m in sys.modules if m.startswith('safeopt_')))\n"
            "opt = safeopt.wrap(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))\n"
            "print('safeopt_torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
