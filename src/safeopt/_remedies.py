"""The remedies for exploding gradients, in the order a practitioner tries them.

Clip by norm, a lower learning rate, clip by value, a weight penalty, a
smaller batch, fewer layers, ReLU instead of sigmoid/tanh, and for recurrent
models LSTM/GRU units or truncated backpropagation through time (Pascanu et
al., 2013; Brownlee, 2017). Remedies the policy already applies are phrased
as "harder". :func:`safeopt.diagnose` offers them only when its verdict is
"exploding".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from safeopt._policy import Policy

if TYPE_CHECKING:
    from safeopt._diagnosis import Sign

_RECURRENT = ("rnn", "recurrent", "weight_hh", "hh_", "lstm", "gru", "cell")
_GATED = ("lstm", "gru")


@dataclasses.dataclass(frozen=True)
class Remedy:
    """A change to try, with the safeopt config that makes it when there is one."""

    key: str
    text: str
    config: dict[str, Any] | None = None


def remedies_for(policy: Policy, signs: Sequence[Sign],
                 names: Sequence[str] = ()) -> list[Remedy]:
    """The remedies that fit ``signs``, in the order a practitioner tries them.

    Clip by norm, a lower learning rate, clip by value, a weight penalty, a
    smaller batch, fewer layers, ReLU instead of sigmoid/tanh, and for
    recurrent models LSTM/GRU units or truncated backpropagation through
    time. Remedies the policy already applies are phrased as "harder".
    """
    keys = {s.key for s in signs}
    if not keys:
        return []
    exploding = bool(keys & {"nonfinite", "loss_unstable", "weight_growth", "grad_growth"})
    out: list[Remedy] = []
    if exploding:
        out.append(_norm_remedy(policy))
        out.append(Remedy("lower_lr", "Lower the learning rate (or warm it up over the first "
                          "few hundred steps): too large a step is the usual cause of a run "
                          "that diverges."))
        out.append(_value_remedy(policy))
    if keys & {"weight_growth", "nonfinite"} or (exploding and not policy.has_penalty):
        out.append(_penalty_remedy(policy))
    out.append(Remedy("smaller_batch", "Train with a smaller batch (more, noisier updates of "
                      "smaller size) and, with it, a lower learning rate."))
    if keys & {"grad_growth", "nonfinite", "no_traction"}:
        out.append(Remedy("fewer_layers", "Use fewer layers: every layer multiplies the "
                          "gradient on its way back, so a shallower model explodes less."))
        out.append(Remedy("relu", "Use ReLU (or GELU) activations instead of sigmoid/tanh, "
                          "with He initialisation, or add normalisation layers."))
    recurrent = _recurrent_remedy(names)
    if recurrent is not None:
        out.append(recurrent)
    return out


def _norm_remedy(policy: Policy) -> Remedy:
    if policy.clip_norm is None:
        return Remedy("clip_norm", "Clip gradients by norm: safeopt.wrap(opt, "
                      "{'clip_norm': 1.0}), or {'adaptive': 'zscore'} to derive the threshold "
                      "from the run's own gradient norms (ZClip).", {"clip_norm": 1.0})
    if policy.adaptive is None:
        return Remedy("clip_norm", f"Clip by norm harder: lower clip_norm (now "
                      f"{policy.clip_norm:g}) or add adaptive='zscore' (ZClip).",
                      {"clip_norm": policy.clip_norm / 2, "adaptive": "zscore"})
    return Remedy("clip_norm", f"Clip by norm harder: lower clip_norm (now "
                  f"{policy.clip_norm:g}), the cap of the adaptive threshold.",
                  {"clip_norm": policy.clip_norm / 2})


def _value_remedy(policy: Policy) -> Remedy:
    if policy.clip_value is None:
        return Remedy("clip_value", "Clip gradients by value: {'clip_value': 0.5} bounds "
                      "every element (after the penalty, before the norm clip).",
                      {"clip_value": 0.5})
    return Remedy("clip_value", f"Clip by value harder: lower clip_value (now "
                  f"{policy.clip_value:g}).", {"clip_value": policy.clip_value / 2})


def _penalty_remedy(policy: Policy) -> Remedy:
    if not policy.has_penalty:
        return Remedy("penalty", "Add a weight penalty: {'l2': 1e-4} (or {'l2': 1e-4, "
                      "'penalty_when': 'weights_above', 'weight_growth_max': 0.01} to apply "
                      "it only while the weights grow fast).", {"l2": 1e-4})
    return Remedy("penalty", f"Raise the weight penalty (now l1={policy.l1:g}, "
                  f"l2={policy.l2:g}).", {"l2": max(policy.l2 * 10, 1e-4)})


def _recurrent_remedy(names: Sequence[str]) -> Remedy | None:
    lowered = [n.lower() for n in names]
    if not any(tag in n for n in lowered for tag in _RECURRENT):
        return None
    if any(tag in n for n in lowered for tag in _GATED):
        return Remedy("truncated_bptt", "Recurrent model: truncate backpropagation through "
                      "time (backpropagate through fewer steps, e.g. detach the hidden state "
                      "every k steps).")
    return Remedy("gated_rnn", "Recurrent model: use LSTM or GRU units instead of a vanilla "
                  "RNN, or truncate backpropagation through time (fewer steps per backward "
                  "pass).")
