"""Skipping data after a recovery, as PaLM does: :func:`skip_after_recovery`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from safeopt._summary import stats

T = TypeVar("T")


def skip_after_recovery(batches: Iterable[T], source: Any, skip: int,
                        every: int = 1) -> Iterator[T]:
    """Yields ``batches``, dropping the next ``skip`` of them after each recovery.

    With ``recover=True`` safeopt restores the last good snapshot in place,
    without rewinding the data: the batches of the rolled-back updates are
    not seen again. PaLM (Chowdhery et al., 2022, section 5.1) also skipped
    the 200-500 batches around a spike, so that the run does not meet the
    data that led to it again; this does that for any iterable of batches.

    Args:
      batches: The batches (a data loader, an iterator).
      source: The wrapped optimizer (torch, Keras, a plug-in's), or a
        zero-argument callable returning the current wrapped Optax state.
      skip: Batches to drop after each recovery.
      every: Look for a new recovery every this many batches (each look is
        one read of safeopt's counters: a host synchronisation on an
        accelerator).

    Example:
      >>> # opt = safeopt.wrap(torch.optim.AdamW(...), {"recover": True})
      >>> # for x, y in safeopt.skip_after_recovery(loader, opt, skip=200):
      >>> #     ...; opt.step(loss=loss)
    """
    if skip < 0 or every < 1:
        raise ValueError(f"`skip` must be >= 0 and `every` >= 1. Received: skip={skip}, "
                         f"every={every}")
    read: Callable[[], Any] = source if callable(source) and not hasattr(
        source, "step") else (lambda: source)
    seen, dropping = None, 0
    for i, batch in enumerate(batches):
        if i % every == 0:
            recoveries = stats(read()).get("recoveries", 0)
            if seen is not None and recoveries > seen:
                dropping = skip
            seen = recoveries
        if dropping:
            dropping -= 1
            continue
        yield batch
