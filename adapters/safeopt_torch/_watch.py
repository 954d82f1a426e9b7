"""The divergence guard's read of the skip streak: deterministic, and never a stall.

On an accelerator the step never waits for the device, so the streak
(``consecutive_skips`` and how many of them were NaN/Inf) is copied every
step, without blocking, into a ring of pinned host buffers, and the copy
made ``lag`` steps earlier is read, waiting for it if it has not landed yet
(by then it almost always has: a training loop's host runs at most a step or
two ahead of the device). So :class:`safeopt.DivergenceError` comes exactly
``lag`` steps after the step that reached ``max_consecutive_skips``, on
every rank alike (every rank holds the same counters and reads them on the
same step), however fast or slow the device is. On CPU there is no device
to wait for and the streak is read at once (``lag = 0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Steps between a skip streak reaching the limit and the error, on an accelerator.
LAG = 2


class StreakWatch:
    """Copies the streak every step and reads it ``lag`` steps later.

    Args:
      lag: Steps between a copy and its read (``None``: 0 on CPU, :data:`LAG`
        elsewhere).
      event: Makes an event that marks a copy (``torch.Event`` by default;
        tests pass a slow one).
    """

    def __init__(self, lag: int | None = None, event: Any = None) -> None:
        self.lag = lag
        self._event = event
        self._buffers: list[Tensor] = []
        self._events: list[Any] = []
        self._pushed = 0
        self.last_lag = 0  # the lag of the last push: its values are that many steps old

    def push(self, streak: Tensor) -> tuple[int, ...] | None:
        """Starts reading ``streak`` (int32: ``[consecutive skips, of them NaN/Inf, ...]``).

        Returns:
          The values of ``lag`` steps ago, once there are some; ``None`` before.
        """
        lag = self.lag if self.lag is not None else (0 if streak.device.type == "cpu" else LAG)
        self.last_lag = lag
        if lag == 0:
            return tuple(int(v) for v in streak.detach().cpu().numpy())
        if not self._buffers:
            pin = torch.cuda.is_available() and streak.device.type == "cuda"
            self._buffers = [torch.empty(streak.shape, dtype=streak.dtype, pin_memory=pin)
                             for _ in range(lag + 1)]
            self._events = [None] * (lag + 1)
        slot = self._pushed % (lag + 1)
        self._buffers[slot].copy_(streak.detach(), non_blocking=True)
        event = (self._event or torch.Event)(device=streak.device)
        event.record()
        self._events[slot] = event
        self._pushed += 1
        if self._pushed <= lag:
            return None
        old = self._pushed % (lag + 1)  # the slot written lag steps ago
        self._events[old].synchronize()
        return tuple(int(v) for v in self._buffers[old].numpy())
