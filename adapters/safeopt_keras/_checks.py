"""What the wrapper refuses in an inner optimizer, with the remedy."""

from __future__ import annotations

from typing import Any

import keras

_CLIP_ARGS = {
    "global_clipnorm": lambda v: {"clip_norm": v, "norm_scope": "global"},
    "clipnorm": lambda v: {"clip_norm": v, "norm_scope": "per_tensor"},
    "clipvalue": lambda v: {"clip_value": v},
}


def check_inner(inner: Any, wrapper: type) -> None:
    """Refuses inner optimizers whose own features would act twice or first.

    Args:
      inner: The optimizer to wrap.
      wrapper: The wrapper's class (an inner optimizer already wrapped is refused).
    """
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise TypeError(
            "`inner_optimizer` must be a `keras.optimizers.Optimizer`. "
            f"Received: inner_optimizer={inner!r} of type {type(inner).__name__}"
        )
    if isinstance(inner, (wrapper, keras.optimizers.LossScaleOptimizer)):
        raise ValueError(
            "`inner_optimizer` must not be a `LossScaleOptimizer` or already wrapped by "
            "safeopt: wrap the plain optimizer and put the loss scaling outside, "
            "`keras.optimizers.LossScaleOptimizer(safeopt.wrap(opt, policy))`, so that "
            "safeopt sees unscaled gradients. "
            f"Received: inner_optimizer={type(inner).__name__}"
        )
    for arg, remedy in _CLIP_ARGS.items():
        value = getattr(inner, arg, None)
        if value is not None:
            raise ValueError(
                f"`inner_optimizer` must not clip gradients itself: safeopt clips them (after "
                f"its non-finite check and penalty), so clipping there would apply twice. "
                f"Received: {arg}={value}. Remove `{arg}` from the inner optimizer and put it "
                f"in the policy instead: {remedy(value)}."
            )
    if inner.gradient_accumulation_steps:
        raise ValueError(
            "`inner_optimizer` must not accumulate gradients: safeopt would decide on each "
            "micro-batch instead of on the accumulated gradient. "
            f"Received: gradient_accumulation_steps={inner.gradient_accumulation_steps}. "
            "Accumulate in the training loop (or use a larger batch) instead."
        )
