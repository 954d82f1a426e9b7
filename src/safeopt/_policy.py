"""The safeopt policy: an immutable, validated configuration.

A :class:`Policy` says what safeopt does to every gradient update: skip it
when it carries NaN/Inf, add an L1/L2 weight penalty, clip every element to a
bound, clip the norm. It loads from keyword arguments, a mapping, a TOML,
YAML or JSON file, a preset name or the ``SAFEOPT_CONFIG`` environment
variable, and every path validates the same way, so a typo or an
out-of-range value fails early with a message that names the key, the value
received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from safeopt._errors import PolicyError
from safeopt._specs import SPECS, check_combinations, did_you_mean, reject_unknown

NormScope = Literal["global", "per_tensor", "unitwise"]
Adaptive = Literal["zscore", "percentile"]
SpikeOn = Literal["loss", "grad_norm"]
PenaltyWhen = Literal["always", "weights_above"]

ENV_VAR = "SAFEOPT_CONFIG"
_FILE_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


class _ValidatingMeta(type):
    """Checks ``Policy(**kwargs)`` for unknown keys before the dataclass sees them."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise PolicyError(
                f"Policy takes keyword arguments only. Received: {len(args)} positional"
            )
        reject_unknown(kwargs)
        return super().__call__(**kwargs)


@dataclasses.dataclass(frozen=True)
class Policy(metaclass=_ValidatingMeta):
    """What safeopt does to each gradient update.

    Inside one step the actions run in a fixed order: non-finite check,
    penalty added, value clip, norm clip. So after a step that is not skipped
    every element satisfies ``|g| <= clip_value`` and the norm satisfies
    ``||g|| <= clip_norm``; a skipped step changes nothing but the skip
    counters.

    Attributes:
      clip_norm: Threshold on the gradient L2 norm; ``None`` (or ``False``)
        turns norm clipping off. With ``norm_scope="unitwise"`` it is the
        AGC clipping ratio lambda instead (Brock et al., 2021).
      norm_scope: ``"global"`` (one norm over all gradients, as
        ``torch.nn.utils.clip_grad_norm_`` and ``optax.clip_by_global_norm``;
        Pascanu et al., 2013), ``"per_tensor"`` (each tensor on its own, like
        Keras ``clipnorm``) or ``"unitwise"`` (each output unit against the
        norm of its weights: adaptive gradient clipping).
      clip_value: Clamp every gradient element to ``[-clip_value,
        clip_value]``; ``None`` turns it off (0.5 is the usual value).
      skip_nonfinite: Skip the whole update when any gradient (or the loss,
        when given) is NaN or Inf.
      l1: Coefficient of the ``l1 * sum(|w|)`` penalty (adds
        ``l1 * sign(w)`` to each gradient).
      l2: Coefficient of the ``l2 * sum(w**2)`` penalty (adds ``2 * l2 * w``
        to each gradient), exactly the term a Keras ``L1L2`` regulariser adds.
      unitwise_eps: AGC's floor on the weight norm of a unit.
      max_consecutive_skips: Raise :class:`safeopt.DivergenceError` after
        this many skipped steps in a row; ``None`` never raises.
      adaptive: ``None`` (fixed ``clip_norm``), ``"zscore"`` (ZClip) or
        ``"percentile"`` (AutoClip): derive the norm threshold from the run's
        own gradient-norm history, capped by ``clip_norm``.
      zscore_alpha: ZClip's EMA smoothing factor.
      zscore_z: ZClip's z-score threshold.
      warmup: Steps before an adaptive threshold takes over (``clip_norm``
        applies until then).
      percentile: AutoClip's percentile of the norm history.
      history: Size of AutoClip's ring buffer of norms.
      spike_skip: ``None``, ``"loss"`` or ``"grad_norm"``: skip an update
        whose loss (or gradient norm) exceeds its running mean by more than
        ``spike_k`` running standard deviations.
      spike_window: Window of the running mean and variance.
      spike_k: How many standard deviations make a spike.
      spike_warmup: Updates seen before spike skipping becomes active.
      penalty_when: ``"always"``, or ``"weights_above"``: apply the L1/L2
        penalty only while the weight norm exceeds ``weight_norm_max`` or grows
        faster than ``weight_growth_max`` per step (relative).
      weight_norm_max: Weight-norm threshold for ``penalty_when``.
      weight_growth_max: Relative weight-norm growth per step above which the
        adaptive penalty turns on.
      recover: Restore the last good snapshot (parameters, optimizer state,
        safeopt's statistics) when the run diverges, instead of raising: see
        :mod:`safeopt._features.recovery` (PaLM's restart, done in place).
      snapshot_every: Updates between snapshots (taken only when healthy).
      max_recoveries: Restores allowed; the next divergence raises
        :class:`safeopt.DivergenceError` naming them.
      recover_patience: Updates in a row whose loss (or gradient norm)
        stays ``spike_k`` standard deviations above its baseline that count
        as a divergence.
      recover_lr_factor: The learning rate right after a restore, as a
        fraction of its scheduled value.
      recover_warmup: Updates over which the factor returns linearly to 1.
      log_every: Telemetry interval in steps; 0 (the default) records nothing.
        Every ``log_every``-th step, one host read builds a record (see
        :mod:`safeopt._telemetry`) and hands it to the sinks below and to
        those added with :func:`safeopt.add_sink`.
      log_file: Path of a JSON Lines file that records are appended to
        (read by ``safeopt report``); ``None`` for none.
      log_logger: Name of a Python :mod:`logging` logger that records go to
        (at INFO level); ``None`` for none.
      log_tensorboard: Directory of TensorBoard event files (needs the
        ``tensorboard`` package, or ``tensorboardX``); ``None`` for none.
      log_top_k: How many layers (largest gradient-norm EMA first) a record
        lists.
      monitor_every: Every this many steps the adapters also gather the
        global weight norm for the diagnosis (one extra read of the
        parameters on those steps only); 0 turns it off.
      monitor_window: Window, in steps, of the per-layer statistics the
        diagnosis reads (EMAs with ``alpha = 1 - 1 / monitor_window``).
    """

    clip_norm: float | None = 1.0
    norm_scope: NormScope = "global"
    clip_value: float | None = None
    skip_nonfinite: bool = True
    l1: float = 0.0
    l2: float = 0.0
    unitwise_eps: float = 1e-3
    max_consecutive_skips: int | None = 100
    adaptive: Adaptive | None = None
    zscore_alpha: float = 0.97
    zscore_z: float = 2.5
    warmup: int = 25
    percentile: float = 10.0
    history: int = 1024
    spike_skip: SpikeOn | None = None
    spike_window: int = 128
    spike_k: float = 6.0
    spike_warmup: int = 64
    penalty_when: PenaltyWhen = "always"
    weight_norm_max: float | None = None
    weight_growth_max: float | None = None
    recover: bool = False
    snapshot_every: int = 100
    max_recoveries: int = 3
    recover_patience: int = 10
    recover_lr_factor: float = 0.1
    recover_warmup: int = 100
    log_every: int = 0
    log_file: str | None = None
    log_logger: str | None = None
    log_tensorboard: str | None = None
    log_top_k: int = 16
    monitor_every: int = 10
    monitor_window: int = 50

    def __post_init__(self) -> None:
        for spec in SPECS:
            value = spec.check(getattr(self, spec.key))
            object.__setattr__(self, spec.key, value)
        check_combinations(self)

    # -- derived properties -------------------------------------------------
    @property
    def is_noop(self) -> bool:
        """True when the policy never changes an update (the ``off`` preset)."""
        return (
            self.clip_norm is None
            and self.clip_value is None
            and not self.skip_nonfinite
            and self.l1 == 0.0
            and self.l2 == 0.0
            and self.spike_skip is None
        )

    @property
    def has_penalty(self) -> bool:
        """True when an L1 or L2 penalty may be added to the gradients."""
        return self.l1 != 0.0 or self.l2 != 0.0

    @property
    def needs_params(self) -> bool:
        """True when the policy reads the parameters (penalty, unitwise)."""
        return self.has_penalty or (
            self.clip_norm is not None and self.norm_scope == "unitwise"
        )

    @property
    def needs_weight_norm(self) -> bool:
        """True when the decision reads the global weight norm."""
        return self.has_penalty and self.penalty_when == "weights_above"

    def replace(self, **changes: Any) -> Policy:
        """Returns a copy with ``changes`` applied (and validated)."""
        reject_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Returns the policy as a plain mapping that ``Policy(**m)`` accepts."""
        return dataclasses.asdict(self)

    # -- loaders --------------------------------------------------------------
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Policy:
        """Builds a policy from a mapping, rejecting unknown keys.

        A mapping with a single ``safeopt`` table (as a TOML file has) is
        unwrapped first.
        """
        if not isinstance(mapping, Mapping):
            raise PolicyError(
                f"A policy mapping must be a mapping of config keys. "
                f"Received: {type(mapping).__name__}"
            )
        table = _unwrap_table(mapping)
        reject_unknown(table)
        return cls(**table)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Loads a policy from a TOML, YAML or JSON file.

        The keys may sit in a ``[safeopt]`` table (or ``[tool.safeopt]`` in a
        ``pyproject.toml``) or at the file's top level. YAML is read with
        ``yaml.safe_load``: no config can execute code.
        """
        file = Path(path)
        if not file.is_file():
            raise PolicyError(f"Policy file not found. Received: path={str(path)!r}")
        return cls.from_mapping(_read_file(file))

    @classmethod
    def from_preset(cls, name: str) -> Policy:
        """Returns the named preset (see :data:`PRESETS`)."""
        if name not in PRESETS:
            raise PolicyError(
                f"`preset` must be one of {sorted(PRESETS)}"
                f"{did_you_mean(name, PRESETS)}. Received: preset={name!r}"
            )
        return cls.from_mapping(PRESETS[name])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Policy:
        """Loads ``$SAFEOPT_CONFIG``: a preset name, a file path or inline JSON.

        Falls back to the defaults when the variable is unset. A variable set
        but empty is refused (it is almost always a mistake in a launch
        script); every error says that it came from the variable.
        """
        env = os.environ if environ is None else environ
        if ENV_VAR not in env:
            return cls()
        value = env[ENV_VAR].strip()
        if not value:
            raise PolicyError(
                f"${ENV_VAR} is set but empty: unset it to use the defaults, or give a preset "
                f"name ({', '.join(sorted(PRESETS))}), a file path or inline JSON. "
                f"Received: {ENV_VAR}={env[ENV_VAR]!r}")
        try:
            return _from_string(value)
        except PolicyError as err:
            raise PolicyError(f"${ENV_VAR}: {err}") from None


PolicyLike = Union[Policy, Mapping[str, Any], str, "os.PathLike[str]", None]


def load_policy(spec: PolicyLike = None) -> Policy:
    """Turns anything :func:`safeopt.wrap` accepts as a policy into a :class:`Policy`.

    Args:
      spec: A :class:`Policy`; a mapping of config keys; a preset name; a
        path to a TOML/YAML/JSON file; or ``None``, which reads
        ``$SAFEOPT_CONFIG`` and falls back to the defaults.

    Returns:
      The validated policy.

    Raises:
      PolicyError: naming the key, the value received and what is allowed.
    """
    if spec is None:
        return Policy.from_env()
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        return Policy.from_mapping(spec)
    if isinstance(spec, (str, os.PathLike)):
        return _from_string(os.fspath(spec))
    raise PolicyError(
        "`policy` must be a Policy, a mapping, a preset name, a file path or None. "
        f"Received: policy={spec!r}"
    )


#: Named policies. ``off`` turns the wrapper into a pass-through (for A/B runs).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "off": {"clip_norm": None, "skip_nonfinite": False, "max_consecutive_skips": None},
    "strict": {"clip_norm": 1.0, "clip_value": 0.5},
    "agc": {"clip_norm": 0.01, "norm_scope": "unitwise"},
    "zscore": {"adaptive": "zscore"},
    "autoclip": {"adaptive": "percentile"},
    "spike": {"spike_skip": "loss"},
    # The language-model benchmarks' best configuration (README, "Does it save runs?"):
    # clip at 1.0, skip an update whose gradient norm is 4 standard deviations above the
    # last 32, from the 8th update on, and recover from a divergence to a snapshot at
    # most 25 updates old.
    "robust": {"recover": True, "snapshot_every": 25, "spike_skip": "grad_norm",
               "spike_window": 32, "spike_warmup": 8, "spike_k": 4.0},
}


# ---------------------------------------------------------------------------
# Helpers for loaders.
# ---------------------------------------------------------------------------
def _unwrap_table(mapping: Mapping[str, Any]) -> dict[str, Any]:
    tool = mapping.get("tool")
    if isinstance(tool, Mapping) and isinstance(tool.get("safeopt"), Mapping):
        return dict(tool["safeopt"])
    table = mapping.get("safeopt")
    if isinstance(table, Mapping):
        return dict(table)
    return dict(mapping)


def _read_file(file: Path) -> Mapping[str, Any]:
    suffix = file.suffix.lower()
    text = file.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            return _read_yaml(text, file)
        if suffix == ".json":
            data = json.loads(text)
        else:
            raise PolicyError(
                f"A policy file must end in one of {list(_FILE_SUFFIXES)}. "
                f"Received: path={str(file)!r}"
            )
    except (ValueError, TypeError) as err:  # tomllib/json decode errors
        if isinstance(err, PolicyError):
            raise
        raise PolicyError(f"Cannot parse policy file {str(file)!r}: {err}") from None
    return _as_mapping(data, file)


def _read_yaml(text: str, file: Path) -> Mapping[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - depends on the environment
        raise PolicyError(
            f"Reading {str(file)!r} needs PyYAML: pip install pyyaml"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PolicyError(f"Cannot parse policy file {str(file)!r}: {err}") from None
    return _as_mapping({} if data is None else data, file)


def _as_mapping(data: Any, file: Path) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise PolicyError(
            f"A policy file must hold a mapping of config keys. "
            f"Received: {type(data).__name__} in {str(file)!r}"
        )
    return data


def _from_string(value: str) -> Policy:
    """A preset name, a file path, or inline JSON (``'{"clip_norm": 1}'``)."""
    if value.lstrip().startswith("{"):
        try:
            return Policy.from_mapping(json.loads(value))
        except json.JSONDecodeError as err:
            raise PolicyError(f"the inline JSON policy is invalid ({err}). "
                              f"Received: policy={value!r}") from None
    if value in PRESETS:
        return Policy.from_preset(value)
    if value.lower().endswith(_FILE_SUFFIXES) or os.sep in value or Path(value).exists():
        return Policy.from_file(value)
    raise PolicyError(
        f"`policy` must be a preset name (one of {sorted(PRESETS)}), a path to a "
        f".toml/.yaml/.json file or inline JSON{did_you_mean(value, PRESETS)}. "
        f"Received: policy={value!r}"
    )
