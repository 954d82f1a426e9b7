"""Exceptions raised by safeopt."""

from __future__ import annotations

from typing import Any


class PolicyError(ValueError):
    """A policy key, value or file is invalid.

    The message names the key, the value received and what is allowed, in the
    form Keras uses: "`key` must be ... Received: key=value".
    """


class AdapterError(TypeError):
    """No installed adapter accepts the object given to :func:`safeopt.wrap`."""


class DivergenceError(RuntimeError):
    """Too many consecutive updates were skipped: the run is diverging.

    Attributes:
      diagnosis: The :class:`safeopt.Diagnosis` of the run when it was raised
        (``None`` when the adapter could not build one).
      stats: The counters read when it was raised.
    """

    def __init__(self, message: str, *, diagnosis: Any = None,
                 stats: dict[str, Any] | None = None) -> None:
        detail = f"\n\n{diagnosis}" if diagnosis is not None else ""
        super().__init__(message + detail)
        self.diagnosis = diagnosis
        self.stats = stats or {}
