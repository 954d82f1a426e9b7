"""The protected step, written once: gather, decide, apply.

* **gather** (:func:`gather`) reads the gradients with the adapter's
  kernels (:class:`~safeopt._kernels.Kernels`): per-tensor norms, the
  weight norm on monitor updates, and it adds the penalty, clips by value
  and applies a local norm-clip scope, in this order;
* **decide** (:func:`decide`) is pure array math over the statistics and
  the features' states: skip or not, the global clip scale, the new state.
  Nothing branches in Python on an array's value: every choice is a
  ``where``, so decisions stay on the device and trace under ``jax.jit``,
  ``tf.function`` and ``torch.compile``;
* **apply** (:func:`apply`) scales the gradients by the global clip scale.
  Skipping is the adapter's shell's job (a ``cond``, a select, a fused
  kernel's ``found_inf``): it hands the gradients to the inner optimizer
  only when ``decision.skip`` is false.

:func:`step` runs the three. A skipped update never happened: the new state
differs from the old one only in the fields each feature declares
skippable (:func:`safeopt._state.keep_on_skip`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from safeopt._features import adaptive, counters, monitor, penalty, recovery, scope, spike
from safeopt._kernels import Kernels
from safeopt._policy import Policy
from safeopt._state import State, keep_on_skip
from safeopt._xp import Array, Namespace


class GradStats(NamedTuple):
    """What gather hands to :func:`decide`.

    Attributes:
      norm: Global L2 norm after the penalty and the value clip (what norm
        clipping acts on), float32 0-d.
      raw_norm: Global norm of the raw gradients; ``None`` means ``norm``.
      finite: Whether the raw gradients (and the loss) are all finite;
        ``None`` derives it from ``raw_norm``.
      max_abs: Largest ``|g|`` before the value clip (counts value clips).
      loss: The update's loss, when given.
      clipped: For the local scopes: whether any tensor or unit was clipped.
      weight_norm: Global L2 norm of the parameters that have a gradient.
      weight_due: Whether ``weight_norm`` was gathered this update: ``True``
        (a Python bool) or a bool array (gathered under a device conditional).
      tensor_norms: Raw L2 norm of each gradient over all parameter tensors
        (0 for those without a gradient), float32 1-d: the per-layer monitor.
      present: bool 1-d, the tensors that have a gradient (``None``: all).
    """

    norm: Array
    raw_norm: Array | None = None
    finite: Array | None = None
    max_abs: Array | None = None
    loss: Array | None = None
    clipped: Array | None = None
    weight_norm: Array | None = None
    weight_due: Any = True
    tensor_norms: Array | None = None
    present: Array | None = None


class Decision(NamedTuple):
    """What to do with this update's gradients.

    Attributes:
      skip: bool, skip the whole update (also when it recovers).
      scale: float32 in (0, 1], the global norm-clip multiplier (1 for the
        local scopes, which have clipped already).
      threshold: float32, the norm threshold in force (``inf`` without norm
        clipping).
      clipped: bool, whether a norm clip changed the applied update.
      recover: bool, restore the snapshot instead (``None`` unless the policy
        recovers; see :mod:`safeopt._features.recovery`).
      snapshot: bool, snapshot the state before this update (``None`` likewise).
      lr_factor: float32, the learning-rate back-off to apply to this update
        (``None`` likewise).
    """

    skip: Array
    scale: Array
    threshold: Array
    clipped: Array
    recover: Array | None = None
    snapshot: Array | None = None
    lr_factor: Array | None = None


class Observed(NamedTuple):
    """This update's values, as the features read them."""

    norm: Array  # float32, the norm clipping acts on
    raw_norm: Array  # float32, the norm of the raw gradients
    loss: Array | None  # float32
    finite: Array  # bool: gradients and loss finite
    t: Array  # int32: this update's index (steps + skips before it)


class Step(NamedTuple):
    """What :func:`step` returns."""

    grads: list[Array]  # what the inner optimizer should see (if not skipped)
    decision: Decision
    state: State
    stats: GradStats


def monitor_due(policy: Policy, state: State) -> Array:
    """Whether this update gathers the weight norm: its index ``% monitor_every == 0``."""
    c = state.counters
    return (c.steps + c.skips) % max(policy.monitor_every, 1) == 0


def gather(k: Kernels, policy: Policy, state: State, grads: Sequence[Array],
           params: Sequence[Array] | None = None, loss: Array | None = None, *,
           positions: Sequence[int] | None = None, n_tensors: int | None = None,
           due: Any = None) -> tuple[list[Array], GradStats]:
    """Statistics of the gradients, with the penalty, value clip and local scope applied.

    Args:
      k: The adapter's kernels.
      policy: The policy in force.
      state: The state before this update.
      grads: The gradients that exist this update.
      params: The matching parameters (the penalty, the unitwise scope and
        the weight norm need them).
      loss: The update's loss, if known.
      positions: Position of each gradient among all ``n_tensors`` parameter
        tensors (``None``: all present, in order).
      n_tensors: Number of parameter tensors the state was sized for.
      due: Whether to gather the weight norm for the monitor (a Python bool
        or a bool array); ``None`` derives it from the state.

    Returns:
      ``(grads, stats)``: the gradients changed so far, and the statistics.
    """
    xp = k.xp
    grads = list(grads)
    if policy.needs_params and params is None:
        raise ValueError("This policy needs the parameters (a penalty or unitwise clipping): "
                         "pass params. Received: params=None")
    raw = k.grad_norms(grads)
    raw_norm = xp.sqrt(xp.sum(raw * raw))
    weight_norm, weight_due = _weight_norm(k, policy, state, params, due)
    l1, l2 = penalty.coefficients(xp, policy, state.penalty, weight_norm)
    if policy.has_penalty and params is not None:
        grads = k.add_penalty(grads, params, l1, l2)
    max_abs = None
    if policy.clip_value is not None:
        max_abs = k.max_abs(grads)
        grads = k.clamp(grads, policy.clip_value)
    norms = k.grad_norms(grads) if policy.has_penalty or policy.clip_value is not None else raw
    norm = raw_norm if norms is raw else xp.sqrt(xp.sum(norms * norms))
    grads, clipped = scope.clip_local(k, policy, grads, params, norms)
    full, present = k.expand(raw, positions, len(grads) if n_tensors is None else n_tensors)
    return grads, GradStats(norm=norm, raw_norm=raw_norm, max_abs=max_abs, loss=loss,
                            clipped=clipped, weight_norm=weight_norm, weight_due=weight_due,
                            tensor_norms=full, present=present)


def _weight_norm(k: Kernels, policy: Policy, state: State, params: Sequence[Array] | None,
                 due: Any) -> tuple[Array | None, Any]:
    if params is None:
        return None, False
    if policy.needs_weight_norm:
        return k.global_norm(params), True
    if policy.monitor_every <= 0:
        return None, False
    due = monitor_due(policy, state) if due is None else due
    if isinstance(due, bool):  # decided on the host: gather or not
        return (k.global_norm(params), True) if due else (None, False)
    return k.when(due, lambda: k.global_norm(params), float("nan")), due


def decide(xp: Namespace, policy: Policy, state: State,
           stats: GradStats) -> tuple[Decision, State]:
    """Decides this update: skip, the global clip scale, and the new state.

    Pure and branch-free on array values.

    Args:
      xp: The namespace of the statistics and the state.
      policy: The policy in force.
      state: The state before this update.
      stats: This update's :class:`GradStats`.

    Returns:
      ``(decision, new_state)``.
    """
    seen = _observe(xp, state, stats)
    threshold, taken_in = adaptive.threshold(xp, policy, state.adaptive, seen.norm)
    value = None if policy.spike_skip is None else spike.watched(policy, seen.raw_norm,
                                                                  seen.loss)
    is_spike = spike.is_spike(xp, policy, state.spike, value)
    skip = _skip(xp, policy, seen, is_spike)
    plan = None
    if isinstance(state.recovery, recovery.RecoveryState):
        streak = state.counters.consecutive_skips + 1
        plan = recovery.plan(xp, policy, state.recovery, seen, stats, skip, streak)
        skip = xp.logical_or(skip, plan.recover)
    apply = xp.logical_not(skip)
    if policy.clip_norm is not None and policy.norm_scope == "global":
        scale, clipped = scope.global_clip(xp, seen.norm, threshold)
    else:
        clipped = _false(xp, seen.norm) if stats.clipped is None else stats.clipped
        scale = xp.full_like(seen.norm, 1.0, xp.float32)
    decision = Decision(skip=skip, scale=xp.astype(scale, xp.float32),
                        threshold=xp.astype(threshold, xp.float32),
                        clipped=xp.logical_and(apply, clipped),
                        recover=None if plan is None else plan.recover,
                        snapshot=None if plan is None else plan.snapshot,
                        lr_factor=None if plan is None else plan.lr_factor)
    new = State(
        counters=counters.update(xp, policy, state.counters, seen, decision,
                                 _false(xp, seen.norm) if is_spike is None else is_spike,
                                 stats),
        adaptive=adaptive.update(xp, policy, state.adaptive, taken_in),
        spike=spike.update(xp, state.spike, value),
        penalty=penalty.update(xp, state.penalty, stats.weight_norm),
        monitor=monitor.update(xp, policy, state.monitor, state.counters, seen, stats, apply),
        recovery=state.recovery if plan is None else plan.state,
    )
    return decision, keep_on_skip(xp, state, new, apply)


def _observe(xp: Namespace, state: State, stats: GradStats) -> Observed:
    f32 = xp.float32
    norm = xp.astype(stats.norm, f32)
    raw_norm = norm if stats.raw_norm is None else xp.astype(stats.raw_norm, f32)
    loss = None if stats.loss is None else xp.astype(stats.loss, f32)
    finite = xp.isfinite(raw_norm) if stats.finite is None else stats.finite
    if loss is not None:
        finite = xp.logical_and(finite, xp.isfinite(loss))
    c = state.counters
    return Observed(norm, raw_norm, loss, finite, c.steps + c.skips)


def _skip(xp: Namespace, policy: Policy, seen: Observed, is_spike: Array | None) -> Array:
    """Skip on NaN/Inf (``skip_nonfinite``) or on a finite spike."""
    nonfinite = xp.logical_not(seen.finite)
    if is_spike is None:
        return nonfinite if policy.skip_nonfinite else _false(xp, seen.norm)
    spiked = xp.logical_and(seen.finite, is_spike)
    return xp.logical_or(nonfinite, spiked) if policy.skip_nonfinite else spiked


def _false(xp: Namespace, like: Array) -> Array:
    return xp.full_like(like, False, xp.bool)


def apply(k: Kernels, policy: Policy, decision: Decision, grads: list[Array]) -> list[Array]:
    """Applies the global norm clip (the local scopes have clipped in :func:`gather`)."""
    if policy.clip_norm is not None and policy.norm_scope == "global":
        return k.scale(grads, decision.scale)
    return grads


def step(k: Kernels, policy: Policy, state: State, grads: Sequence[Array],
         params: Sequence[Array] | None = None, loss: Array | None = None, *,
         positions: Sequence[int] | None = None, n_tensors: int | None = None,
         due: Any = None) -> Step:
    """Gathers, decides and applies one protected update (see :func:`gather`'s arguments).

    Returns:
      A :class:`Step`: the gradients for the inner optimizer (meaningless
      when ``decision.skip``), the decision, the new state and the statistics.
    """
    changed, stats = gather(k, policy, state, grads, params, loss, positions=positions,
                            n_tensors=n_tensors, due=due)
    decision, new_state = decide(k.xp, policy, state, stats)
    return Step(apply(k, policy, decision, changed), decision, new_state, stats)
