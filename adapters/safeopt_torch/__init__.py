"""safeopt's PyTorch adapter: ``safeopt.wrap(torch_optimizer, policy)``.

The wrapper is a :class:`SafeOptimizer`, itself a ``torch.optim.Optimizer``
sharing ``param_groups`` and ``state`` with the optimizer it wraps. Fused
optimizers (``Adam``, ``AdamW``, ``SGD`` with ``fused=True``; ``Adagrad`` with
``fused=True`` on CPU) take the ``"fused"`` path: the policy's decision reaches
the kernel through its ``grad_scale`` / ``found_inf`` inputs with no host
synchronisation. Every other optimizer takes the ``"foreach"`` path: one host
synchronisation per step, for the skip. ``safeopt.stats(opt)["path"]`` says
which one a run gets. On CPU, where the device is the host, the decision is
taken on the host and applied by branching (``stats(opt)["decisions"] ==
"host"``); see :mod:`safeopt_torch._runner`.
"""

from __future__ import annotations

from typing import Any

import torch

import safeopt.adapter as sa
from safeopt import Policy
from safeopt_torch._optimizer import SafeOptimizer


class TorchAdapter(sa.Adapter):
    """Registers ``torch.optim.Optimizer`` with safeopt (entry point ``torch``)."""

    name = "torch"
    demo = "safeopt_torch.demo"

    def accepts(self, optimizer: Any) -> bool:
        """Any ``torch.optim.Optimizer`` that safeopt has not wrapped already."""
        return isinstance(optimizer, torch.optim.Optimizer) and not isinstance(
            optimizer, SafeOptimizer)

    def wrap(self, optimizer: Any, policy: Policy) -> SafeOptimizer:
        """Returns ``optimizer`` wrapped in a :class:`SafeOptimizer`."""
        return SafeOptimizer(optimizer, policy)

    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` is a :class:`SafeOptimizer`."""
        return isinstance(obj, SafeOptimizer)

    def read(self, obj: Any) -> tuple[Policy, sa.State, dict[str, Any]]:
        """``(policy, state as NumPy arrays, extra)``; ``extra`` has ``path`` and ``names``."""
        assert isinstance(obj, SafeOptimizer)
        return obj.read()


__all__ = ["SafeOptimizer", "TorchAdapter"]
