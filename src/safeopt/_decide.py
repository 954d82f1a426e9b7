"""The decision function: pure array math, written once for every framework.

Every step an adapter gathers gradient statistics with its framework's fast
kernels (:class:`GradStats`), calls :func:`decide` with its array namespace
and applies the :class:`Decision` idiomatically (fused-kernel inputs, foreach
ops, ``select``). Nothing here branches in Python on an array's value: all
decisions are ``where`` selections, so they stay on the device and trace
under ``jax.jit``, ``tf.function`` and ``torch.compile``.

:func:`protect` is the whole pipeline over lists of arrays: the NumPy
reference implementation that adapters are tested against, and the
implementation functional adapters (Optax, Keras) run as it is.

References:
  Pascanu, Mikolov & Bengio (2013), On the difficulty of training recurrent
  neural networks. https://arxiv.org/abs/1211.5063 (norm clipping).
  Brock, De, Smith & Simonyan (2021), High-Performance Large-Scale Image
  Recognition Without Normalization. https://arxiv.org/abs/2102.06171 (AGC).
  Kumar et al. (2025), ZClip: Adaptive Spike Mitigation for LLM Pre-Training.
  https://arxiv.org/abs/2504.02507 (z-score threshold).
  Seetharaman, Wichern, Pardo & Le Roux (2020), AutoClip: Adaptive Gradient
  Clipping for Source Separation Networks. https://arxiv.org/abs/2007.14469
  (percentile threshold).
  OLMo Team (2024), 2 OLMo 2 Furious. https://arxiv.org/abs/2501.00656, and
  Levanter's skip-step optimizer (loss-spike skipping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from safeopt._policy import Policy
from safeopt._xp import Array, Namespace

_TINY = 1e-12
_FLOAT32_MAX = 3.4028234663852886e38
_ZCLIP_EPS = 1e-6  # ZClip's epsilon in the z-score denominator
_SPIKE_STD_FLOOR = 1e-6  # Levanter's floor on the running standard deviation

#: The fields a skipped update may change: the skip counters and the NaN/Inf onset
#: tracking of the monitor. Every other field stays bit-identical on a skip.
SKIP_FIELDS: frozenset[str] = frozenset({
    "skips", "consecutive_skips", "nonfinite", "spikes", "first_nonfinite_step",
    "weight_nonfinite_step", "sign_since", "sign_last", "sign_count",
})

#: The signs of exploding gradients the monitor tracks, in ``sign_*`` order.
SIGNS: tuple[str, ...] = ("nonfinite", "loss_unstable", "weight_growth", "layer_norms",
                          "no_traction")
#: |robust z| of a loss change that counts as an outlier (Iglewicz & Hoaglin's 3.5).
LOSS_Z = 3.5
#: Fraction (EMA over ``monitor_window``) of outlying loss changes that fires sign (b).
LOSS_OUTLIER_FRAC = 0.2
#: Fraction (EMA over ``monitor_window``) of steps with a layer norm above 1 that fires (d).
LAYER_OVER_FRAC = 0.5
#: Relative improvement of the smoothed loss that counts as progress (sign (e)).
LOSS_PROGRESS = 0.01
#: Sign (e) needs the best smoothed loss still above this fraction of the first loss.
TRACTION_FRACTION = 0.5


class PolicyState(NamedTuple):
    """safeopt's own per-run state; every field is a 0-d or 1-d array.

    Counters are ``int32``; statistics are ``float32``. A skipped step
    changes only the skip counters (``skips``, ``consecutive_skips``,
    ``nonfinite``, ``spikes``) and the non-finite monitor fields
    (``first_nonfinite_step``, ``weight_nonfinite_step`` and the ``sign_*``
    entries of the signs a skipped step can show: NaN/Inf gradients and NaN
    weights); everything else is left bit-identical.

    "Call index" below is ``steps + skips`` before the call: the 0-based
    index of the update, applied or skipped.
    """

    steps: Array  # applied (not skipped) updates
    skips: Array  # skipped updates, all causes
    consecutive_skips: Array  # skipped updates in a row, 0 after an applied one
    nonfinite: Array  # updates that carried NaN/Inf (skipped or not)
    spikes: Array  # updates skipped as loss / grad-norm spikes
    norm_clips: Array  # applied updates whose norm was clipped
    value_clips: Array  # applied updates in which some element was clipped
    last_norm: Array  # pre-clip global norm of the last applied update
    last_scale: Array  # global norm-clip scale of the last applied update
    threshold: Array  # norm threshold used by the last applied update
    last_loss: Array  # loss of the last applied update (NaN if never given)
    last_weight_norm: Array  # global weight norm at the last applied update (NaN if unknown)
    ema_mean: Array  # ZClip: EMA mean of the gradient norm (Welford mean in warm-up)
    ema_var: Array  # ZClip: EMA variance of the gradient norm (Welford M2/n in warm-up)
    norm_history: Array  # AutoClip: ring buffer of gradient norms
    spike_history: Array  # loss-spike skip: ring buffer of losses or gradient norms
    spike_count: Array  # values written into spike_history
    layer_norm_ema: Array  # per tensor: EMA of the raw gradient norm (monitor)
    layer_over_frac: Array  # per tensor: EMA of 1[raw gradient norm > 1] (monitor)
    layer_over_since: Array  # per tensor: call index since which layer_over_frac > 0.5, or -1
    sign_since: Array  # per sign (see SIGNS): call index the latest episode began, or -1
    sign_last: Array  # per sign: call index it last fired, or -1
    sign_count: Array  # per sign: calls on which it fired
    first_nonfinite_step: Array  # call index of the first NaN/Inf gradient or loss, or -1
    weight_nonfinite_step: Array  # call index of the first NaN/Inf weight norm, or -1
    loss_deltas: Array  # ring buffer of step-to-step loss changes (monitor_window)
    loss_count: Array  # loss changes written into loss_deltas
    loss_outlier_frac: Array  # EMA of 1[|robust z of the loss change| > LOSS_Z]
    loss_ema: Array  # EMA of the loss (time constant monitor_window / 5)
    loss_first: Array  # first loss seen (NaN before)
    loss_best: Array  # lowest loss_ema so far (inf before)
    loss_best_step: Array  # call index loss_best last improved by LOSS_PROGRESS, or -1
    wnorm_last: Array  # last weight norm observed by the monitor (NaN before)
    wnorm_last_step: Array  # call index of that observation, or -1
    wnorm_rate: Array  # EMA of the relative weight-norm growth per step


class GradStats(NamedTuple):
    """Gradient statistics an adapter hands to :func:`decide`.

    Attributes:
      norm: Global L2 norm of the gradients after the penalty and the value
        clip (the norm that norm clipping acts on), float32, 0-d.
      finite: Whether the raw gradients (and the loss) are all finite. ``None``
        derives it from ``raw_norm``.
      raw_norm: Global norm of the raw gradients; ``None`` means ``norm``.
      max_abs: Largest ``|g|`` before the value clip (counts value clips).
      loss: The step's loss, when the caller gave it.
      clipped: For ``per_tensor`` and ``unitwise`` scopes: whether any tensor or
        unit was clipped (the adapter applies those scales itself).
      weight_norm: Global L2 norm of the parameters, when gathered.
      tensor_norms: Raw (pre-clip) L2 norm of each gradient tensor, float32,
        1-d, in parameter order: feeds the per-layer monitor.
    """

    norm: Array
    finite: Array | None = None
    raw_norm: Array | None = None
    max_abs: Array | None = None
    loss: Array | None = None
    clipped: Array | None = None
    weight_norm: Array | None = None
    tensor_norms: Array | None = None


class Decision(NamedTuple):
    """What to do with this step's gradients.

    Attributes:
      skip: bool, skip the whole update.
      scale: float32, the global norm-clip multiplier in (0, 1] (1 for the
        ``per_tensor`` and ``unitwise`` scopes, which clip tensor by tensor).
      inv_scale: float32, ``1 / scale`` computed directly (``norm /
        threshold`` or exactly 1): what a kernel that divides by a
        ``grad_scale`` wants.
      found_inf: float32, exactly 0.0 or 1.0: ``skip`` as torch's fused
        optimizers read it.
      threshold: float32, the norm threshold in force (``inf`` when norm
        clipping is off).
      clipped: bool, whether norm clipping changed the gradients.
    """

    skip: Array
    scale: Array
    inv_scale: Array
    found_inf: Array
    threshold: Array
    clipped: Array


# ---------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------
def state_shapes(policy: Policy, n_tensors: int = 0) -> dict[str, tuple[tuple[int, ...], str]]:
    """Returns ``{field: (shape, dtype name)}`` of the state for ``policy``.

    Ring buffers are allocated only for the policies that use them; per-layer
    monitor fields have one entry per parameter tensor.
    """
    ring = policy.history if policy.adaptive == "percentile" else 1
    spike = policy.spike_window if policy.spike_skip is not None else 1
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in PolicyState._fields:
        dtype = "float32" if name in _FLOAT_FIELDS else "int32"
        shapes[name] = ((), dtype)
    shapes["norm_history"] = ((ring,), "float32")
    shapes["spike_history"] = ((spike,), "float32")
    shapes["layer_norm_ema"] = ((n_tensors,), "float32")
    shapes["layer_over_frac"] = ((n_tensors,), "float32")
    shapes["layer_over_since"] = ((n_tensors,), "int32")
    for name in ("sign_since", "sign_last", "sign_count"):
        shapes[name] = ((len(SIGNS),), "int32")
    monitor = policy.monitor_window if policy.monitor_every > 0 else 1
    shapes["loss_deltas"] = ((monitor,), "float32")
    return shapes


_FLOAT_FIELDS = frozenset({
    "last_norm", "last_scale", "threshold", "last_loss", "last_weight_norm", "ema_mean",
    "ema_var", "norm_history", "spike_history", "layer_norm_ema", "layer_over_frac",
    "loss_deltas", "loss_outlier_frac", "loss_ema", "loss_first", "loss_best", "wnorm_last",
    "wnorm_rate",
})
_MINUS_ONE = frozenset({
    "layer_over_since", "sign_since", "sign_last", "first_nonfinite_step",
    "weight_nonfinite_step", "loss_best_step", "wnorm_last_step",
})
_NAN = frozenset({"last_loss", "last_weight_norm", "last_norm", "loss_first", "wnorm_last",
                  "wnorm_rate"})


def _initial_value(name: str, policy: Policy) -> float:
    if name in _NAN:
        return math.nan
    if name in _MINUS_ONE:
        return -1
    if name == "last_scale":
        return 1.0
    if name == "loss_best":
        return math.inf
    if name == "threshold":
        return math.inf if policy.clip_norm is None else float(policy.clip_norm)
    return 0.0


def init_state(xp: Namespace, policy: Policy, like: Array | None = None,
               n_tensors: int = 0) -> PolicyState:
    """Returns the initial :class:`PolicyState` for ``policy``.

    Args:
      xp: The array namespace (see :func:`safeopt.namespace`).
      policy: The policy whose state to build.
      like: An array whose device the state should live on (torch).
      n_tensors: Number of parameter tensors (sizes the per-layer monitor).
    """
    fields = {}
    for name, (shape, dtype_name) in state_shapes(policy, n_tensors).items():
        dtype = getattr(xp, dtype_name)
        value = _initial_value(name, policy)
        fields[name] = xp.asarray(_filled(shape, value), dtype, like=like)
    return PolicyState(**fields)


def _filled(shape: tuple[int, ...], value: float) -> Any:
    if not shape:
        return value
    return [value] * shape[0] if shape[0] else []


# ---------------------------------------------------------------------------
# Elementwise helpers adapters apply per tensor or per unit.
# ---------------------------------------------------------------------------
def clip_scale(xp: Namespace, norm: Array, threshold: Array | float) -> Array:
    """Norm-clip multiplier: ``threshold / norm`` where ``norm > threshold``, else 1.

    A non-finite norm gives 1 (the non-finite check decides about it), an
    infinite threshold gives 1, and the result is always in (0, 1].
    """
    over = xp.logical_and(norm > threshold, xp.isfinite(norm))
    return xp.where(over, threshold / xp.where(over, norm, 1.0), 1.0)


def unit_scale(xp: Namespace, grad_norm: Array, weight_norm: Array, clipping: float,
               eps: float) -> Array:
    """AGC multiplier per unit, as ``optax.adaptive_grad_clip`` computes it.

    A unit's gradient is rescaled to ``clipping * max(||w||, eps)`` when its
    norm is at least that (Brock et al., 2021).
    """
    max_norm = xp.maximum(weight_norm, eps) * clipping
    keep = grad_norm < max_norm
    return xp.where(keep, 1.0, max_norm / xp.maximum(grad_norm, 1e-6))


def unit_norms(xp: Namespace, x: Array, unit_axis: int) -> Array:
    """L2 norm of each output unit of ``x`` (keepdims), the AGC convention.

    Tensors of rank <= 1 are one unit. For rank >= 2, ``unit_axis`` names the
    output axis: ``-1`` for JAX/Keras kernels ``(..., in, out)``, ``0`` for
    torch weights ``(out, in, ...)``.
    """
    rank = xp.ndim(x)
    sq = x * x
    if rank <= 1:
        return xp.sqrt(xp.sum(sq, axis=None, keepdims=False))
    axis = unit_axis % rank
    axes = tuple(a for a in range(rank) if a != axis)
    return xp.sqrt(xp.sum(sq, axis=axes, keepdims=True))


def penalty_coefficients(xp: Namespace, policy: Policy, state: PolicyState,
                         weight_norm: Array | None = None) -> tuple[Any, Any]:
    """Returns ``(l1, l2)`` for this step.

    Python floats when ``penalty_when="always"`` (adapters skip the work when
    both are 0); with ``penalty_when="weights_above"``, float32 arrays that are
    the configured coefficients while the weight norm exceeds
    ``weight_norm_max`` or grows faster than ``weight_growth_max`` per step,
    and 0 otherwise.
    """
    if policy.penalty_when == "always" or not policy.has_penalty:
        return policy.l1, policy.l2
    if weight_norm is None:
        raise ValueError("penalty_when='weights_above' needs the weight norm")
    on = _weights_above(xp, policy, state, weight_norm)
    l1 = xp.where(on, xp.asarray(policy.l1, xp.float32), 0.0)
    l2 = xp.where(on, xp.asarray(policy.l2, xp.float32), 0.0)
    return l1, l2


def _weights_above(xp: Namespace, policy: Policy, state: PolicyState, wnorm: Array) -> Array:
    on = xp.asarray(False, xp.bool)
    if policy.weight_norm_max is not None:
        on = xp.logical_or(on, wnorm > policy.weight_norm_max)
    if policy.weight_growth_max is not None:
        last = state.last_weight_norm
        growth = (wnorm - last) / xp.maximum(last, _TINY)
        known = xp.isfinite(last)
        on = xp.logical_or(on, xp.logical_and(known, growth > policy.weight_growth_max))
    return on


# ---------------------------------------------------------------------------
# The decision.
# ---------------------------------------------------------------------------
def decide(xp: Namespace, policy: Policy, state: PolicyState,
           stats: GradStats) -> tuple[Decision, PolicyState]:
    """Decides this step: skip, norm-clip scale, and the new state.

    Pure and branch-free on array values; counters and statistics of a
    skipped step stay as they were, except the skip counters.

    Args:
      xp: The array namespace of the statistics.
      policy: The policy in force.
      state: The state returned by the previous call (or :func:`init_state`).
      stats: This step's :class:`GradStats`.

    Returns:
      ``(decision, new_state)``.
    """
    f32 = xp.float32
    norm = xp.astype(stats.norm, f32)
    raw_norm = norm if stats.raw_norm is None else xp.astype(stats.raw_norm, f32)
    loss = None if stats.loss is None else xp.astype(stats.loss, f32)
    finite = _finite(xp, stats, raw_norm, loss)

    threshold, adaptive_input = _threshold(xp, policy, state, norm)
    spike = _spike(xp, policy, state, raw_norm, loss)
    nonfinite_skip = xp.logical_not(finite) if policy.skip_nonfinite else xp.asarray(False, xp.bool)
    skip = xp.logical_or(nonfinite_skip, xp.logical_and(finite, spike))
    apply = xp.logical_not(skip)

    if policy.clip_norm is not None and policy.norm_scope == "global":
        clipped = xp.logical_and(norm > threshold, xp.isfinite(norm))
        scale = clip_scale(xp, norm, threshold)
        inv_scale = xp.where(clipped, xp.minimum(norm / threshold, _FLOAT32_MAX), 1.0)
    else:
        clipped = xp.asarray(False, xp.bool) if stats.clipped is None else stats.clipped
        scale = xp.asarray(1.0, f32, like=norm)
        inv_scale = scale
    decision = Decision(
        skip=skip,
        scale=xp.astype(scale, f32),
        inv_scale=xp.astype(inv_scale, f32),
        found_inf=xp.astype(skip, f32),
        threshold=xp.astype(threshold, f32),
        clipped=xp.logical_and(apply, clipped),
    )
    new_state = _next_state(xp, policy, state, stats, decision,
                            _Observed(norm, raw_norm, loss, finite, spike, adaptive_input))
    return decision, new_state


class _Observed(NamedTuple):
    """This step's values that the state update reads (internal)."""

    norm: Array  # the norm clipping acts on
    raw_norm: Array  # the norm of the raw gradients
    loss: Array | None
    finite: Array
    spike: Array
    adaptive_input: Array | None  # what the adaptive threshold's statistics take in


def _finite(xp: Namespace, stats: GradStats, raw_norm: Array, loss: Array | None) -> Array:
    finite = xp.isfinite(raw_norm) if stats.finite is None else stats.finite
    if loss is not None:
        finite = xp.logical_and(finite, xp.isfinite(loss))
    return finite


def _threshold(xp: Namespace, policy: Policy, state: PolicyState,
               norm: Array) -> tuple[Array, Array | None]:
    """The norm threshold in force, and the value the adaptive statistics take in.

    ``clip_norm`` when the policy is not adaptive or still warming up; an
    adaptive threshold capped by ``clip_norm`` otherwise (see
    :func:`_zscore_threshold` and :func:`_percentile_threshold`).
    """
    if policy.clip_norm is None:
        return xp.asarray(math.inf, xp.float32, like=norm), None
    cap = xp.asarray(policy.clip_norm, xp.float32, like=norm)
    if policy.adaptive == "zscore":
        adaptive, taken_in = _zscore_threshold(xp, policy, state, norm)
        warm = state.steps >= max(policy.warmup, 1)
        taken_in = xp.where(warm, taken_in, norm)  # the warm-up collects plain norms
    elif policy.adaptive == "percentile":
        adaptive, taken_in = _percentile_threshold(xp, policy, state, norm)
        warm = state.steps >= policy.warmup
    else:
        return cap, None
    adaptive = xp.maximum(adaptive, _TINY)  # keeps the clip scale > 0
    return xp.where(warm, xp.minimum(adaptive, cap), cap), taken_in


def _zscore_threshold(xp: Namespace, policy: Policy, state: PolicyState,
                      norm: Array) -> tuple[Array, Array]:
    """ZClip's threshold ("zscore" mode, "adaptive_scaling" clip option).

    With ``mu`` and ``sigma`` the EMA mean and standard deviation of past
    norms and ``z = (g - mu) / (sigma + 1e-6)``: when ``z > z_thres`` the norm
    is clipped to ``mu + z_thres**2 * sigma / z`` (the reciprocal rule: the
    larger the outlier, the harder it is clipped), and that clipped value is
    what the EMA takes in; otherwise the norm is not clipped adaptively
    (the threshold returned is the z-score boundary ``mu + z_thres * (sigma +
    1e-6)``, which the norm does not exceed) and the EMA takes in the norm
    itself. ``clip_norm`` caps the threshold but not what the EMA takes in,
    as ZClip's ``max_grad_norm`` does.

    References:
      Kumar, Owen, Nelson, Hakim & Patel (2025), ZClip: Adaptive Spike
      Mitigation for LLM Pre-Training. https://arxiv.org/abs/2504.02507, and
      its reference code (``zclip.ZClip``, github.com/bluorion-com/ZClip).
    """
    z_thres = policy.zscore_z
    std = xp.sqrt(xp.maximum(state.ema_var, 0.0))
    z = (norm - state.ema_mean) / (std + _ZCLIP_EPS)
    outlier = z > z_thres
    reciprocal = state.ema_mean + (z_thres * z_thres) * std / xp.where(outlier, z, 1.0)
    boundary = state.ema_mean + z_thres * (std + _ZCLIP_EPS)
    threshold = xp.where(outlier, reciprocal, boundary)
    return threshold, xp.where(outlier, reciprocal, norm)


def _percentile_threshold(xp: Namespace, policy: Policy, state: PolicyState,
                          norm: Array) -> tuple[Array, Array]:
    """AutoClip's threshold: the ``percentile``-th percentile of the norms seen.

    As in AutoClip, this step's norm joins the history before the
    percentile is taken. Unlike AutoClip, whose history grows without bound,
    the history is a ring of the last ``history`` applied updates, and
    ``clip_norm`` applies during the first ``warmup`` updates.

    References:
      Seetharaman, Wichern, Pardo & Le Roux (2020), AutoClip: Adaptive
      Gradient Clipping for Source Separation Networks.
      https://arxiv.org/abs/2007.14469 (github.com/pseeth/autoclip).
    """
    ring = _ring_push(xp, state.norm_history, state.steps, norm)
    return _percentile(xp, policy, ring, xp.minimum(state.steps + 1, policy.history)), norm


def _ring_push(xp: Namespace, ring: Array, count: Array, value: Array) -> Array:
    """Writes ``value`` at position ``count % len(ring)`` (a select, no scatter)."""
    size = ring.shape[0]
    slot = count % size
    return xp.where(xp.arange(size, like=ring) == slot, value, ring)


def _percentile(xp: Namespace, policy: Policy, ring: Array, count: Array) -> Array:
    """The ``policy.percentile``-th percentile of the ``count`` valid ring entries.

    Linear interpolation, as ``numpy.percentile``'s default.
    """
    size = ring.shape[0]
    valid = xp.arange(size, like=ring) < count
    ordered = xp.sort(xp.where(valid, ring, math.inf))
    pos = xp.astype(xp.maximum(count - 1, 0), xp.float32) * (policy.percentile / 100.0)
    lo = xp.astype(pos, xp.int32)  # floor: pos >= 0
    hi = xp.minimum(lo + 1, xp.maximum(count - 1, 0))
    frac = pos - xp.astype(lo, xp.float32)
    low, high = xp.take(ordered, lo), xp.take(ordered, hi)
    return low + (high - low) * frac


def _window_mean_std(xp: Namespace, ring: Array, count: Array) -> tuple[Array, Array]:
    size = ring.shape[0]
    n = xp.minimum(count, size)
    valid = xp.arange(size, like=ring) < n
    denom = xp.astype(xp.maximum(n, 1), xp.float32)
    mean = xp.sum(xp.where(valid, ring, 0.0)) / denom
    dev = xp.where(valid, ring - mean, 0.0)
    return mean, xp.sqrt(xp.sum(dev * dev) / denom)


def _spike(xp: Namespace, policy: Policy, state: PolicyState, norm: Array,
           loss: Array | None) -> Array:
    """Whether this update is a loss / grad-norm spike, to be skipped.

    A spike is a value above ``mean + spike_k * max(std, 1e-6)`` of the last
    ``spike_window`` values (population standard deviation, this step's value
    excluded), once ``spike_warmup`` values have been seen. As the issue
    asks, and unlike Levanter (whose window also takes in skipped updates),
    only applied updates enter the window, and a single value (the loss or
    the raw gradient norm, per ``spike_skip``) is watched.

    References:
      OLMo Team (2024), 2 OLMo 2 Furious. https://arxiv.org/abs/2501.00656
      (skip steps whose loss or gradient norm is 6 standard deviations above
      the mean of the last 128 steps), and Levanter's ``SkipStepConfig``
      (``rolling_interval_length=128``, ``sigma_factor=6``, active from
      ``max(2, 128 // 2)`` values).
    """
    if policy.spike_skip is None:
        return xp.asarray(False, xp.bool)
    value = _spike_value(policy, norm, loss)
    mean, std = _window_mean_std(xp, state.spike_history, state.spike_count)
    active = state.spike_count >= policy.spike_warmup
    return xp.logical_and(active, value > mean + policy.spike_k * xp.maximum(std, _SPIKE_STD_FLOOR))


def _spike_value(policy: Policy, norm: Array, loss: Array | None) -> Array:
    if policy.spike_skip == "grad_norm":
        return norm
    if loss is None:
        raise ValueError(
            "spike_skip='loss' needs the loss: pass it to step(loss=...) / update(value=...)"
        )
    return loss


def _next_state(xp: Namespace, policy: Policy, state: PolicyState, stats: GradStats,
                decision: Decision, seen: _Observed) -> PolicyState:
    skip = decision.skip
    apply = xp.logical_not(skip)
    norm = seen.norm
    one = xp.asarray(1, xp.int32, like=norm)

    def count(counter: Array, event: Array) -> Array:
        return counter + xp.where(event, one, 0 * one)

    def keep(new: Array, old: Array) -> Array:
        return xp.where(apply, new, old)

    value_clipped = xp.asarray(False, xp.bool)
    if policy.clip_value is not None and stats.max_abs is not None:
        value_clipped = xp.logical_and(apply, stats.max_abs > policy.clip_value)
    finite = seen.finite
    updates: dict[str, Array] = {
        "steps": count(state.steps, apply),
        "skips": count(state.skips, skip),
        "consecutive_skips": xp.where(skip, state.consecutive_skips + one, 0 * one),
        "nonfinite": count(state.nonfinite, xp.logical_not(finite)),
        "spikes": count(state.spikes, xp.logical_and(skip, xp.logical_and(finite, seen.spike))),
        "norm_clips": count(state.norm_clips, decision.clipped),
        "value_clips": count(state.value_clips, value_clipped),
        "last_norm": keep(seen.raw_norm, state.last_norm),
        "last_scale": keep(decision.scale, state.last_scale),
        "threshold": keep(decision.threshold, state.threshold),
    }
    if seen.loss is not None:
        updates["last_loss"] = keep(seen.loss, state.last_loss)
    if stats.weight_norm is not None:
        updates["last_weight_norm"] = keep(xp.astype(stats.weight_norm, xp.float32),
                                           state.last_weight_norm)
    updates.update(_adaptive_updates(xp, policy, state, seen.adaptive_input, keep))
    updates.update(_spike_updates(xp, policy, state, seen.raw_norm, seen.loss, keep))
    updates.update(_monitor_updates(xp, policy, state, stats, seen, apply))
    return state._replace(**updates)


def _adaptive_updates(xp: Namespace, policy: Policy, state: PolicyState, taken_in: Array | None,
                      keep: Any) -> dict[str, Array]:
    """Updates the adaptive threshold's statistics (applied updates only).

    ``percentile``: writes the norm into the ring. ``zscore``: during the
    first ``warmup`` applied updates, Welford's running mean and population
    variance of the norms (ZClip collects ``warmup_steps`` norms and
    initialises its EMA with their mean and variance, which this equals at
    the end of the warm-up); afterwards ZClip's EMA,
    ``mu <- a*mu + (1-a)*g'`` then ``var <- a*var + (1-a)*(g' - mu)**2`` with
    the new ``mu``, fed with ``g'`` = the norm, or its reciprocal-clipped
    value on an outlier.
    """
    if policy.adaptive == "percentile":
        assert taken_in is not None
        ring = _ring_push(xp, state.norm_history, state.steps, taken_in)
        return {"norm_history": keep(ring, state.norm_history)}
    if policy.adaptive != "zscore" or taken_in is None:
        return {}
    n = xp.astype(state.steps + 1, xp.float32)
    delta = taken_in - state.ema_mean
    w_mean = state.ema_mean + delta / n
    w_var = state.ema_var + (delta * (taken_in - w_mean) - state.ema_var) / n
    alpha = policy.zscore_alpha
    e_mean = alpha * state.ema_mean + (1.0 - alpha) * taken_in
    e_var = alpha * state.ema_var + (1.0 - alpha) * (taken_in - e_mean) ** 2
    warm = state.steps >= max(policy.warmup, 1)
    mean = xp.where(warm, e_mean, w_mean)
    var = xp.where(warm, e_var, w_var)
    return {"ema_mean": keep(mean, state.ema_mean), "ema_var": keep(var, state.ema_var)}


def _monitor_updates(xp: Namespace, policy: Policy, state: PolicyState, stats: GradStats,
                     seen: _Observed, apply: Array) -> dict[str, Array]:
    """The statistics behind the signs of exploding gradients (see :data:`SIGNS`).

    Each sign is evaluated on the device every step, branch-free; the
    diagnosis (:mod:`safeopt._diagnose`) reads them when asked. ``monitor_every
    = 0`` turns all of it off but the first NaN/Inf step.
    """
    t = state.steps + state.skips  # this call's index
    finite = seen.finite
    first_bad = xp.logical_and(xp.logical_not(finite), state.first_nonfinite_step < 0)
    out: dict[str, Array] = {
        "first_nonfinite_step": xp.where(first_bad, t, state.first_nonfinite_step),
    }
    if policy.monitor_every <= 0:
        return out
    false = t < 0  # a device-resident False (t >= 0), so that stack sees one device
    layers, fire_d = _layer_updates(xp, policy, state, stats, apply, t)
    loss, fire_b, fire_e = _loss_updates(xp, policy, state, seen.loss, apply, t)
    weights, fire_c = _weight_updates(xp, policy, state, stats, apply, t)
    out.update(layers)
    out.update(loss)
    out.update(weights)
    fired = [xp.logical_not(finite), fire_b, fire_c, fire_d, fire_e]
    fires = xp.stack([false if f is None else xp.logical_or(false, f) for f in fired])
    out.update(_sign_updates(xp, policy, state, fires, t))
    return out


def _sign_updates(xp: Namespace, policy: Policy, state: PolicyState, fires: Array,
                  t: Array) -> dict[str, Array]:
    """Episode bookkeeping: a sign silent for ``monitor_window`` calls starts anew."""
    last = state.sign_last
    fresh = xp.logical_or(last < 0, t - last > policy.monitor_window)
    began = xp.logical_and(fires, fresh)
    one = xp.asarray(1, xp.int32, like=last)
    return {
        "sign_since": xp.where(began, t, state.sign_since),
        "sign_last": xp.where(fires, t, last),
        "sign_count": state.sign_count + xp.where(fires, one, 0 * one),
    }


def _min_steps(policy: Policy) -> int:
    """Applied updates a windowed statistic needs before its sign may fire."""
    return max(2, policy.monitor_window // 5)


def _layer_updates(xp: Namespace, policy: Policy, state: PolicyState, stats: GradStats,
                   apply: Array, t: Array) -> tuple[dict[str, Array], Array | None]:
    """Sign (d): per-layer EMAs of the raw gradient norm and of ``norm > 1``."""
    if stats.tensor_norms is None or state.layer_norm_ema.shape[0] == 0:
        return {}, None
    norms = xp.astype(stats.tensor_norms, xp.float32)
    # A running mean over the first monitor_window steps, an EMA afterwards, so
    # that the first steps do not weigh more than the others.
    seen = xp.astype(xp.minimum(state.steps + 1, policy.monitor_window), xp.float32)
    beta = 1.0 / seen
    over = xp.astype(norms > 1.0, xp.float32)
    ema = state.layer_norm_ema + beta * (norms - state.layer_norm_ema)
    frac = state.layer_over_frac + beta * (over - state.layer_over_frac)
    hot = xp.logical_and(frac > LAYER_OVER_FRAC, state.steps + 1 >= _min_steps(policy))
    since = xp.where(hot, xp.where(state.layer_over_since < 0, t, state.layer_over_since), -1)
    fire = xp.logical_and(apply, xp.any(hot))
    return {"layer_norm_ema": xp.where(apply, ema, state.layer_norm_ema),
            "layer_over_frac": xp.where(apply, frac, state.layer_over_frac),
            "layer_over_since": xp.where(apply, since, state.layer_over_since)}, fire


def _robust_z(xp: Namespace, ring: Array, count: Array, value: Array, floor: Array) -> Array:
    """Modified z-score ``0.6745 (x - median) / MAD`` of ``value`` (Iglewicz & Hoaglin)."""
    size = ring.shape[0]
    n = xp.minimum(count, size)
    med = xp.where(n > 0, _masked_median(xp, ring, n), 0.0)
    mad = xp.where(n > 0, _masked_median(xp, xp.abs(ring - med), n), 0.0)
    return 0.6745 * (value - med) / xp.maximum(mad, floor)


def _masked_median(xp: Namespace, ring: Array, n: Array) -> Array:
    size = ring.shape[0]
    ordered = xp.sort(xp.where(xp.arange(size, like=ring) < n, ring, math.inf))
    last = xp.maximum(n - 1, 0)
    lo = last // 2
    hi = last - lo
    return 0.5 * (xp.take(ordered, lo) + xp.take(ordered, hi))


def _loss_updates(xp: Namespace, policy: Policy, state: PolicyState, loss: Array | None,
                  apply: Array, t: Array,
                  ) -> tuple[dict[str, Array], Array | None, Array | None]:
    """Signs (b) unstable loss and (e) no traction, from applied updates with a loss."""
    if loss is None:
        return {}, None, None
    one = xp.asarray(1, xp.int32, like=state.loss_count)
    window = policy.monitor_window
    take = xp.logical_and(apply, xp.isfinite(loss))
    prev = state.last_loss
    delta = loss - xp.where(xp.isfinite(prev), prev, loss)
    push = xp.logical_and(take, xp.isfinite(prev))
    floor = 1e-4 * xp.abs(xp.where(xp.isfinite(prev), prev, 0.0)) + _TINY
    z = _robust_z(xp, state.loss_deltas, state.loss_count, delta, floor)
    warm = state.loss_count >= _min_steps(policy)
    outlier = xp.astype(xp.abs(z) > LOSS_Z, xp.float32)
    frac = state.loss_outlier_frac + (outlier - state.loss_outlier_frac) / window
    frac = xp.where(xp.logical_and(push, warm), frac, state.loss_outlier_frac)
    fire_b = xp.logical_and(xp.logical_and(push, warm), frac > LOSS_OUTLIER_FRAC)

    seen_before = xp.isfinite(state.loss_first)
    ema = xp.where(seen_before, state.loss_ema + (5.0 / window) * (loss - state.loss_ema), loss)
    ema = xp.where(take, ema, state.loss_ema)
    first = xp.where(xp.logical_and(take, xp.logical_not(seen_before)), loss, state.loss_first)
    best = state.loss_best
    improved = xp.logical_and(take, ema < best - LOSS_PROGRESS * xp.abs(
        xp.where(xp.isfinite(best), best, 0.0)))
    new_best = xp.where(improved, ema, best)
    best_step = xp.where(improved, t, state.loss_best_step)
    stuck = xp.logical_and(t - best_step >= window,
                           new_best - first > -TRACTION_FRACTION * xp.abs(first))
    fire_e = xp.logical_and(take, stuck)
    updates = {
        "loss_deltas": xp.where(push, _ring_push(xp, state.loss_deltas, state.loss_count, delta),
                                state.loss_deltas),
        "loss_count": state.loss_count + xp.where(push, one, 0 * one),
        "loss_outlier_frac": frac,
        "loss_ema": ema,
        "loss_first": first,
        "loss_best": new_best,
        "loss_best_step": best_step,
    }
    return updates, fire_b, fire_e


def _weight_updates(xp: Namespace, policy: Policy, state: PolicyState, stats: GradStats,
                    apply: Array, t: Array) -> tuple[dict[str, Array], Array]:
    """Sign (c): weight-norm growth rate (EMA over ``monitor_window`` steps) or NaN.

    The weight norm comes from ``stats.weight_norm`` when the adapter gathers
    it before the decision; adapters that write ``last_weight_norm`` after the
    decision are seen at the next call, as a value that changed.
    """
    f32 = xp.float32
    if stats.weight_norm is not None:
        obs = xp.astype(stats.weight_norm, f32)
        new = xp.isfinite(obs)
        bad = xp.logical_not(new)
    else:
        obs = state.last_weight_norm
        new = xp.logical_and(xp.isfinite(obs), obs != state.wnorm_last)
        bad = t < 0  # False
    take = xp.logical_and(new, apply)
    known = state.wnorm_last_step >= 0
    steps = xp.astype(xp.maximum(t - state.wnorm_last_step, 1), f32)
    growth = (obs - state.wnorm_last) / (xp.maximum(state.wnorm_last, _TINY) * steps)
    beta = xp.minimum(steps / policy.monitor_window, 1.0)
    had_rate = xp.isfinite(state.wnorm_rate)
    rate = xp.where(had_rate, state.wnorm_rate + beta * (growth - state.wnorm_rate), growth)
    rate = xp.where(xp.logical_and(take, known), rate, state.wnorm_rate)
    fast = xp.logical_and(xp.logical_and(take, known), rate > 1.0 / policy.monitor_window)
    first_bad = xp.logical_and(bad, state.weight_nonfinite_step < 0)
    return {
        "wnorm_last": xp.where(take, obs, state.wnorm_last),
        "wnorm_last_step": xp.where(take, t, state.wnorm_last_step),
        "wnorm_rate": rate,
        "weight_nonfinite_step": xp.where(first_bad, t, state.weight_nonfinite_step),
    }, xp.logical_or(fast, bad)


def _spike_updates(xp: Namespace, policy: Policy, state: PolicyState, norm: Array,
                   loss: Array | None, keep: Any) -> dict[str, Array]:
    if policy.spike_skip is None:
        return {}
    value = _spike_value(policy, norm, loss)
    ring = _ring_push(xp, state.spike_history, state.spike_count, value)
    one = xp.asarray(1, xp.int32, like=norm)
    return {
        "spike_history": keep(ring, state.spike_history),
        "spike_count": keep(state.spike_count + one, state.spike_count),
    }


# ---------------------------------------------------------------------------
# The whole pipeline over lists of arrays.
# ---------------------------------------------------------------------------
def global_norm(xp: Namespace, arrays: Sequence[Array]) -> Array:
    """L2 norm over all ``arrays`` together, accumulated in float32."""
    total = xp.asarray(0.0, xp.float32, like=arrays[0] if arrays else None)
    for a in arrays:
        a32 = xp.astype(a, xp.float32)
        total = total + xp.sum(a32 * a32)
    return xp.sqrt(total)


def protect(xp: Namespace, policy: Policy, state: PolicyState, grads: Sequence[Array],
            params: Sequence[Array] | None = None, loss: Array | None = None,
            unit_axis: int = -1, track_weight_norm: bool = False,
            ) -> tuple[list[Array], Decision, PolicyState]:
    """Runs one protected step over lists of gradients.

    Order: non-finite check, penalty added, value clip, norm clip. The
    gradients returned are what the inner optimizer should see; when
    ``decision.skip`` is true the caller must leave parameters and optimizer
    state untouched (the returned gradients are then meaningless).

    Args:
      xp: The array namespace of ``grads``.
      policy: The policy in force.
      state: safeopt's state from the previous step.
      grads: One gradient per parameter.
      params: The parameters, in the same order (needed by the penalty and
        the unitwise scope).
      loss: This step's loss, if known.
      unit_axis: Output-unit axis for ``norm_scope="unitwise"``: ``-1`` for
        JAX/Keras kernels, ``0`` for torch weights.
      track_weight_norm: Also compute the global weight norm (one more read
        of the parameters) for the diagnosis; the adaptive penalty computes
        it anyway.

    Returns:
      ``(new_grads, decision, new_state)``.
    """
    grads = list(grads)
    if policy.needs_params and params is None:
        raise ValueError(
            "This policy needs the parameters (penalty or unitwise clipping): pass params."
        )
    tensor_norms = _tensor_norms(xp, grads)
    raw_norm = xp.sqrt(xp.sum(tensor_norms * tensor_norms)) if grads else global_norm(xp, grads)
    want_wnorm = policy.needs_weight_norm or track_weight_norm
    weight_norm = global_norm(xp, params) if want_wnorm and params is not None else None
    l1, l2 = penalty_coefficients(xp, policy, state, weight_norm)
    if policy.has_penalty and params is not None:
        grads = [_add_penalty(xp, g, w, l1, l2) for g, w in zip(grads, params)]
    max_abs = None
    if policy.clip_value is not None:
        max_abs = _max_abs(xp, grads)
        v = policy.clip_value
        grads = [xp.clip(g, -v, v) for g in grads]
    changed = policy.has_penalty or policy.clip_value is not None
    norm = global_norm(xp, grads) if changed else raw_norm
    grads, clipped = _scope_clip(xp, policy, grads, params, unit_axis)
    stats = GradStats(norm=norm, raw_norm=raw_norm, max_abs=max_abs, loss=loss,
                      clipped=clipped, weight_norm=weight_norm,
                      tensor_norms=tensor_norms if grads else None)
    decision, new_state = decide(xp, policy, state, stats)
    if policy.clip_norm is not None and policy.norm_scope == "global":
        grads = [g * xp.astype(decision.scale, g.dtype) for g in grads]
    return grads, decision, new_state


def _tensor_norms(xp: Namespace, grads: Sequence[Array]) -> Array:
    """The L2 norm of each tensor, float32, stacked into one 1-d array."""
    if not grads:
        return xp.zeros((0,), xp.float32)
    return xp.stack([global_norm(xp, [g]) for g in grads])


def _is_zero(c: Any) -> bool:
    return isinstance(c, float) and c == 0.0


def _add_penalty(xp: Namespace, g: Array, w: Array, l1: Any, l2: Any) -> Array:
    """Adds the gradient of ``l1 * sum(|w|) + l2 * sum(w**2)`` to ``g``."""
    def coef(c: Any) -> Any:
        return c if isinstance(c, float) else xp.astype(c, g.dtype)

    out = g
    if not _is_zero(l1):
        out = out + coef(l1) * xp.sign(w)
    if not _is_zero(l2):
        out = out + 2.0 * coef(l2) * w
    return out


def _max_abs(xp: Namespace, grads: Sequence[Array]) -> Array:
    maxes = [xp.astype(xp.max(xp.abs(g)), xp.float32) for g in grads if math.prod(g.shape) > 0]
    if not maxes:
        return xp.asarray(0.0, xp.float32)
    return xp.max(xp.stack(maxes))


def _scope_clip(xp: Namespace, policy: Policy, grads: list[Array],
                params: Sequence[Array] | None, unit_axis: int) -> tuple[list[Array], Array | None]:
    """Per-tensor or unitwise clipping; global clipping waits for the decision."""
    if policy.clip_norm is None or policy.norm_scope == "global" or not grads:
        return grads, None
    if policy.norm_scope == "per_tensor":
        scales = [clip_scale(xp, global_norm(xp, [g]), policy.clip_norm) for g in grads]
    else:
        assert params is not None
        scales = [
            unit_scale(xp, unit_norms(xp, xp.astype(g, xp.float32), unit_axis),
                       unit_norms(xp, xp.astype(w, xp.float32), unit_axis),
                       policy.clip_norm, policy.unitwise_eps)
            for g, w in zip(grads, params)
        ]
    clipped = xp.any(xp.stack([xp.any(s < 1.0) for s in scales]))
    return [g * xp.astype(s, g.dtype) for g, s in zip(grads, scales)], clipped
