"""The policy's keys: one validator per key, and the checks across keys.

Every way of making a policy (keyword arguments, a mapping, a file, a
preset, ``$SAFEOPT_CONFIG``) goes through these, so a typo or an
out-of-range value fails early with a message that names the key, the value
received and what is allowed, in the form Keras uses: "`key` must be ...
Received: key=value".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from typing import Any

from safeopt._errors import PolicyError

NORM_SCOPES = ("global", "per_tensor", "unitwise")
ADAPTIVE = ("zscore", "percentile")
SPIKE_ON = ("loss", "grad_norm")
PENALTY_WHEN = ("always", "weights_above")


@dataclasses.dataclass(frozen=True)
class _Spec:
    key: str
    kind: str  # "float", "int", "bool", "choice", "str"
    allowed: str
    optional: bool = False
    false_is_none: bool = False
    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = True
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> Any:
        if value is None or (self.false_is_none and value is False):
            if self.optional:
                return None
            self._fail(value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                self._fail(value)
            return value
        if self.kind == "choice":
            if value not in self.choices:
                self._fail(value, did_you_mean(value, self.choices))
            return value
        if self.kind == "str":
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str) or not value:
                self._fail(value)
            return value
        return self._check_number(value)

    def _check_number(self, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(value)
        if self.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                self._fail(value)
            number: float | int = int(value)
        else:
            number = float(value)
            if not math.isfinite(number):
                self._fail(value)
        below = self.low is not None and (
            number < self.low or (number == self.low and not self.low_inclusive)
        )
        above = self.high is not None and (
            number > self.high or (number == self.high and not self.high_inclusive)
        )
        if below or above:
            self._fail(value)
        return number

    def _fail(self, value: Any, hint: str = "") -> None:
        raise PolicyError(
            f"`{self.key}` must be {self.allowed}{hint}. Received: {self.key}={value!r}"
        )


def _positive(key: str, optional: bool = False) -> _Spec:
    allowed = "a positive number" + (" or None" if optional else "")
    return _Spec(key, "float", allowed, optional=optional, false_is_none=optional, low=0.0,
                 low_inclusive=False)


def _nonnegative(key: str) -> _Spec:
    return _Spec(key, "float", "a number >= 0", low=0.0)


def _count(key: str, low: int, optional: bool = False) -> _Spec:
    allowed = f"an integer >= {low}" + (" or None" if optional else "")
    return _Spec(key, "int", allowed, optional=optional, false_is_none=optional, low=low)


def _choice(key: str, choices: tuple[str, ...], optional: bool = False) -> _Spec:
    allowed = f"one of {list(choices)}" + (" or None" if optional else "")
    return _Spec(key, "choice", allowed, optional=optional, false_is_none=optional,
                 choices=choices)


SPECS: tuple[_Spec, ...] = (
    _positive("clip_norm", optional=True),
    _choice("norm_scope", NORM_SCOPES),
    _positive("clip_value", optional=True),
    _Spec("skip_nonfinite", "bool", "True or False"),
    _nonnegative("l1"),
    _nonnegative("l2"),
    _positive("unitwise_eps"),
    _count("max_consecutive_skips", 1, optional=True),
    _choice("adaptive", ADAPTIVE, optional=True),
    _Spec("zscore_alpha", "float", "a number in (0, 1)", low=0.0, low_inclusive=False, high=1.0,
          high_inclusive=False),
    _positive("zscore_z"),
    _count("warmup", 0),
    _Spec("percentile", "float", "a number in (0, 100]", low=0.0, low_inclusive=False,
          high=100.0),
    _count("history", 1),
    _choice("spike_skip", SPIKE_ON, optional=True),
    _count("spike_window", 2),
    _positive("spike_k"),
    _count("spike_warmup", 1),
    _choice("penalty_when", PENALTY_WHEN),
    _positive("weight_norm_max", optional=True),
    _positive("weight_growth_max", optional=True),
    _Spec("recover", "bool", "True or False"),
    _count("snapshot_every", 1),
    _count("max_recoveries", 1),
    _count("recover_patience", 1),
    _Spec("recover_lr_factor", "float", "a number in (0, 1]", low=0.0, low_inclusive=False,
          high=1.0),
    _count("recover_warmup", 0),
    _count("log_every", 0),
    _Spec("log_file", "str", "a file path or None", optional=True, false_is_none=True),
    _Spec("log_logger", "str", "a logger name or None", optional=True, false_is_none=True),
    _Spec("log_tensorboard", "str", "a directory or None", optional=True, false_is_none=True),
    _count("log_top_k", 1),
    _count("monitor_every", 0),
    _count("monitor_window", 2),
)

KEYS: tuple[str, ...] = tuple(spec.key for spec in SPECS)


def check_combinations(policy: Any) -> None:
    """Refuses keys that cannot go together."""
    if policy.adaptive is not None and policy.norm_scope != "global":
        raise PolicyError(
            "`adaptive` derives one threshold for the global norm and needs "
            f"norm_scope='global'. Received: adaptive={policy.adaptive!r}, "
            f"norm_scope={policy.norm_scope!r}"
        )
    if policy.adaptive is not None and policy.clip_norm is None:
        raise PolicyError(
            "`adaptive` caps its threshold by `clip_norm`, which must be a positive number. "
            f"Received: adaptive={policy.adaptive!r}, clip_norm=None"
        )
    if policy.adaptive == "percentile" and policy.warmup > policy.history:
        raise PolicyError(
            f"`warmup` must be at most `history` ({policy.history}) with adaptive='percentile'. "
            f"Received: warmup={policy.warmup}"
        )
    if policy.penalty_when == "weights_above" and (
        policy.weight_norm_max is None and policy.weight_growth_max is None
    ):
        raise PolicyError(
            "penalty_when='weights_above' needs `weight_norm_max` or `weight_growth_max`. "
            "Received: weight_norm_max=None, weight_growth_max=None"
        )


def did_you_mean(value: Any, options: Any) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def reject_unknown(mapping: Mapping[str, Any]) -> None:
    for key in mapping:
        if key not in KEYS:
            hint = did_you_mean(key, KEYS) or ""
            raise PolicyError(
                f"Unknown policy key {key!r}{hint}. Allowed keys: {', '.join(KEYS)}. "
                f"Received: {key}={mapping[key]!r}"
            )
