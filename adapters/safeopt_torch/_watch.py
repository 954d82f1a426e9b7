"""Reading the skip streak at a host boundary without blocking."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class HostWatch:
    """Reads ``consecutive_skips`` without blocking.

    On CPU the value is read right away (there is no device to wait for). On
    an accelerator it is copied with ``non_blocking=True`` into pinned memory
    and read at a later :meth:`poll`, once an event says the copy has landed.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._event: Any = None

    def push(self, counter: Tensor) -> int | None:
        """Starts reading ``counter``; returns it when it is readable now."""
        if counter.device.type == "cpu":
            return int(counter.detach().numpy())
        if self._buffer is None:
            self._buffer = torch.empty((), dtype=counter.dtype, pin_memory=True)
        self._buffer.copy_(counter.detach(), non_blocking=True)
        self._event = torch.Event(device=counter.device)
        self._event.record()
        return None

    def poll(self) -> int | None:
        """The counter pushed last, if its copy has completed (never blocks)."""
        if self._event is None or self._buffer is None or not self._event.query():
            return None
        self._event = None
        return int(self._buffer.numpy())
