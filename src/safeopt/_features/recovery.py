"""Recovery: go back to the last good snapshot when the run diverges, then ease back in.

With ``recover=True``, the adapter keeps a snapshot of the parameters, the
inner optimizer's state and safeopt's own statistics, taken every
``snapshot_every`` updates (update index) when the run is healthy at that
update. The run diverges when the skip streak reaches
``max_consecutive_skips``, when the watched value (the loss when given, else
the raw gradient norm) stays ``spike_k`` standard deviations above its
baseline for ``recover_patience`` updates in a row, or when the weight norm
is NaN/Inf. Then the update is not applied, the adapter restores the
snapshot bit for bit (:func:`after_restore` gives safeopt's state), and the
learning rate is multiplied by ``recover_lr_factor``, which returns linearly
to 1 over ``recover_warmup`` updates. After ``max_recoveries`` restores the
next divergence raises :class:`safeopt.DivergenceError`, naming them.

The baseline is an EMA (``1 - 1 / spike_window``) of the watched value over
applied updates that were not spikes, active after ``spike_warmup`` of them:
unlike spike skipping, a lasting jump does not become the new baseline, since
that is what a divergence looks like.

References:
  Chowdhery et al. (2022), PaLM: Scaling Language Modeling with Pathways,
  section 5.1: on a loss spike, restart from a checkpoint about 100 steps
  earlier and skip 200-500 data batches. https://arxiv.org/abs/2204.02311
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from safeopt._features.base import EMPTY, Empty, count_if, filled
from safeopt._xp import Array, Namespace

if TYPE_CHECKING:
    from safeopt._pipeline import GradStats, Observed
    from safeopt._policy import Policy
    from safeopt._state import State

_STD_FLOOR = 1e-6


class RecoveryState(NamedTuple):
    """Restores so far, the snapshot held, and the divergence detector."""

    recoveries: Array  # int32: restores done
    rolled_back: Array  # int32: updates discarded by restores, in all
    last_from: Array  # int32: update index the last restore went back to, or -1
    last_at: Array  # int32: update index at which it happened, or -1
    snapshot_at: Array  # int32: update index of the snapshot held, or -1
    mean: Array  # float32: baseline of the watched value (EMA)
    var: Array  # float32: its variance (EMA)
    count: Array  # int32: values in the baseline
    bad_run: Array  # int32: updates in a row that were spikes or carried NaN/Inf
    exhausted: Array  # int32: 1 once a divergence came with no recovery left
    last_cause: Array  # int32: what fired at the last divergence (bits of :data:`CAUSES`), or 0


SKIPPABLE = frozenset({"bad_run", "exhausted", "last_cause"})

#: What can make the run diverge, by bit of ``RecoveryState.last_cause``.
CAUSES: dict[int, str] = {
    1: "max_consecutive_skips updates in a row were skipped",
    2: "the watched value (the loss when given, else the gradient norm) stayed above its "
       "baseline or was NaN/Inf for recover_patience updates in a row",
    4: "the weights went NaN/Inf",
}


def cause_names(bits: int) -> list[str]:
    """What ``last_cause`` says fired, in words (empty for 0)."""
    return [text for bit, text in CAUSES.items() if bits & bit]
_FLOATS = frozenset({"mean", "var"})
_MINUS_ONE = frozenset({"last_from", "last_at", "snapshot_at"})


def init(xp: Namespace, policy: Policy, n_tensors: int,
         like: Array | None) -> RecoveryState | Empty:
    """A fresh detector and no snapshot (:class:`Empty` unless ``recover``)."""
    if not policy.recover:
        return EMPTY
    return RecoveryState(**{
        name: filled(xp, (), -1 if name in _MINUS_ONE else 0,
                     xp.float32 if name in _FLOATS else xp.int32, like)
        for name in RecoveryState._fields})


class Plan(NamedTuple):
    """What recovery decides for this update."""

    recover: Array  # bool: restore the snapshot (the update is not applied), or, with no
    # recovery left, stop (``state.exhausted``)
    snapshot: Array  # bool: take a snapshot of the state before this update
    lr_factor: Array  # float32: the learning-rate back-off in force
    state: RecoveryState  # the detector after this update


def plan(xp: Namespace, policy: Policy, st: RecoveryState, seen: Observed, stats: GradStats,
         skip: Array, streak: Array) -> Plan:
    """Decides whether this update (index ``seen.t``) recovers, snapshots, backs off.

    Args:
      xp: The namespace.
      policy: The policy (``recover`` is on).
      st: The detector before this update.
      seen: This update's observed values.
      stats: Its statistics (the weight norm, when gathered).
      skip: Whether the update is skipped for another reason.
      streak: The skip streak after this update, were it skipped.
    """
    value = seen.raw_norm if seen.loss is None else seen.loss
    std = xp.maximum(xp.sqrt(xp.maximum(st.var, 0.0)), _STD_FLOOR)
    warm = st.count >= policy.spike_warmup
    spike = xp.logical_and(warm, value > st.mean + policy.spike_k * std)
    bad = xp.logical_or(xp.logical_not(seen.finite), spike)
    bad_run = xp.where(bad, st.bad_run + 1, 0 * st.bad_run)
    weights_bad = _weights_nonfinite(xp, stats)
    patience = bad_run >= policy.recover_patience
    trigger = xp.logical_or(weights_bad, patience)
    zero = 0 * st.last_cause  # int32, like every bit below
    cause = xp.where(patience, zero + 2, zero) + xp.where(weights_bad, zero + 4, zero)
    if policy.max_consecutive_skips is not None:
        too_long = xp.logical_and(skip, streak >= policy.max_consecutive_skips)
        trigger = xp.logical_or(trigger, too_long)
        cause = cause + xp.where(too_long, zero + 1, zero)
    healthy = xp.logical_not(xp.logical_or(xp.logical_or(bad, weights_bad), skip))
    on_cadence = seen.t % policy.snapshot_every == 0
    snapshot = xp.logical_and(xp.logical_and(on_cadence, healthy), xp.logical_not(trigger))
    take = xp.logical_and(xp.logical_and(xp.logical_not(bad), xp.logical_not(skip)),
                          xp.logical_not(trigger))
    alpha = 1.0 - 1.0 / policy.spike_window
    first = st.count == 0
    mean = xp.where(first, value, alpha * st.mean + (1.0 - alpha) * value)
    var = xp.where(first, 0.0 * st.var, alpha * st.var + (1.0 - alpha) * (value - mean) ** 2)
    out_of = xp.logical_or(st.recoveries >= policy.max_recoveries, st.snapshot_at < 0)
    new = st._replace(
        mean=xp.where(take, mean, st.mean), var=xp.where(take, var, st.var),
        count=count_if(xp, st.count, take), bad_run=bad_run,
        snapshot_at=xp.where(snapshot, seen.t, st.snapshot_at),
        exhausted=xp.where(xp.logical_and(trigger, out_of), 1 + 0 * st.exhausted,
                           st.exhausted),
        last_cause=xp.where(trigger, cause, st.last_cause))
    return Plan(trigger, snapshot, lr_factor(xp, policy, st, seen.t), new)


def _weights_nonfinite(xp: Namespace, stats: GradStats) -> Any:
    if stats.weight_norm is None:
        return xp.full_like(stats.norm, False, xp.bool)
    bad = xp.logical_not(xp.isfinite(xp.astype(stats.weight_norm, xp.float32)))
    return bad if stats.weight_due is True else xp.logical_and(stats.weight_due, bad)


def lr_factor(xp: Namespace, policy: Policy, st: RecoveryState, t: Array) -> Array:
    """``recover_lr_factor`` right after a restore, back to 1 over ``recover_warmup`` updates."""
    if policy.recover_warmup == 0:
        return xp.full_like(st.mean, 1.0, xp.float32)
    since = xp.astype(t - st.last_at, xp.float32)
    ramp = xp.minimum(since / policy.recover_warmup, 1.0)
    factor = policy.recover_lr_factor + (1.0 - policy.recover_lr_factor) * ramp
    return xp.where(st.last_at >= 0, factor, 1.0)


def after_restore(xp: Namespace, now: State, snapshot: State) -> State:
    """safeopt's state once the adapter has restored ``snapshot`` (the state it was taken in).

    The statistics that decide (adaptive threshold, spike window, penalty,
    the recovery baseline) go back to the snapshot's; the counters keep
    counting everything that happened (the skip streak is over), the monitor
    keeps its evidence for the diagnosis, and the restore is counted.
    """
    rec, snap_rec = now.recovery, snapshot.recovery
    assert isinstance(rec, RecoveryState) and isinstance(snap_rec, RecoveryState)
    c = now.counters
    t = c.steps + c.skips - 1  # the update that recovered
    zero = 0 * c.consecutive_skips
    counters = c._replace(consecutive_skips=zero, streak_nonfinite=zero)
    recovery = rec._replace(
        mean=snap_rec.mean, var=snap_rec.var, count=snap_rec.count,
        recoveries=rec.recoveries + 1, rolled_back=rec.rolled_back + (t - rec.snapshot_at),
        last_from=rec.snapshot_at, last_at=t, bad_run=0 * rec.bad_run)
    return now._replace(counters=counters, adaptive=snapshot.adaptive, spike=snapshot.spike,
                        penalty=snapshot.penalty, recovery=recovery)
