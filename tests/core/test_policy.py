"""Policy validation and loading: every path validates the same way."""

from __future__ import annotations

import json
import math

import pytest

from safeopt import Policy, PolicyError, load_policy
from safeopt._policy import ENV_VAR
from safeopt._specs import KEYS


def test_defaults_follow_the_contract() -> None:
    p = Policy()
    assert (p.clip_norm, p.norm_scope, p.clip_value, p.skip_nonfinite, p.l1, p.l2) == (
        1.0, "global", None, True, 0.0, 0.0)
    assert list(KEYS[:6]) == ["clip_norm", "norm_scope", "clip_value",
                                       "skip_nonfinite", "l1", "l2"]


def test_policy_is_immutable() -> None:
    with pytest.raises(AttributeError):
        Policy().clip_norm = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("make", [
    lambda cfg: Policy(**cfg),
    lambda cfg: Policy.from_mapping(cfg),
    lambda cfg: load_policy(cfg),
])
def test_typo_suggests_the_key(make) -> None:
    with pytest.raises(PolicyError, match="clip_norm") as info:
        make({"clip_nrom": 1.0})
    assert "clip_nrom" in str(info.value)


@pytest.mark.parametrize("make", [
    lambda cfg: Policy(**cfg),
    lambda cfg: load_policy(cfg),
])
def test_negative_clip_norm_names_key_and_value(make) -> None:
    with pytest.raises(PolicyError) as info:
        make({"clip_norm": -1})
    message = str(info.value)
    assert "clip_norm" in message and "-1" in message and "positive" in message


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("clip_norm", "1.0", "positive number"),
    ("clip_norm", True, "positive number"),
    ("clip_norm", math.inf, "positive number"),
    ("clip_value", 0, "positive number"),
    ("norm_scope", "globl", "did you mean 'global'"),
    ("skip_nonfinite", 1, "True or False"),
    ("l2", -0.1, ">= 0"),
    ("max_consecutive_skips", 0, "integer >= 1"),
    ("max_consecutive_skips", 2.5, "integer >= 1"),
    ("zscore_alpha", 1.0, "(0, 1)"),
    ("percentile", 0, "(0, 100]"),
])
def test_bad_values_name_key_value_and_allowed(key, value, allowed) -> None:
    with pytest.raises(PolicyError) as info:
        Policy(**{key: value})
    message = str(info.value)
    assert f"`{key}`" in message
    assert f"{key}={value!r}" in message
    assert allowed in message


def test_false_and_none_turn_clipping_off() -> None:
    assert Policy(clip_norm=False).clip_norm is None
    assert Policy(clip_norm=None, clip_value=None).clip_value is None


def test_ints_become_floats() -> None:
    p = Policy(clip_norm=2, l2=0)
    assert isinstance(p.clip_norm, float) and isinstance(p.l2, float)


def test_conflicting_keys_are_refused() -> None:
    with pytest.raises(PolicyError, match="norm_scope='global'"):
        Policy(adaptive="zscore", norm_scope="per_tensor")
    with pytest.raises(PolicyError, match="weight_norm_max"):
        Policy(l2=0.1, penalty_when="weights_above")


def test_presets() -> None:
    assert Policy.from_preset("default") == Policy()
    off = load_policy("off")
    assert off.is_noop and not Policy().is_noop
    with pytest.raises(PolicyError, match="did you mean 'default'"):
        load_policy("defualt")
    robust = load_policy("robust")  # recovery and gradient-norm spike skipping on top of clipping
    assert robust.recover and robust.spike_skip == "grad_norm" and robust.clip_norm == 1.0


def test_toml_table_and_top_level(tmp_path) -> None:
    table = tmp_path / "a.toml"
    table.write_text('[safeopt]\nclip_norm = 2.0\nclip_value = 0.5\n')
    top = tmp_path / "b.toml"
    top.write_text('clip_norm = 2.0\nclip_value = 0.5\n')
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\n[tool.safeopt]\nclip_norm = 2.0\nclip_value = 0.5\n'
    )
    expected = Policy(clip_norm=2.0, clip_value=0.5)
    assert load_policy(table) == load_policy(str(top)) == load_policy(pyproject) == expected


def test_yaml_and_json(tmp_path) -> None:
    y = tmp_path / "p.yaml"
    y.write_text("safeopt:\n  clip_norm: 0.5\n  norm_scope: per_tensor\n")
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"clip_norm": 0.5, "norm_scope": "per_tensor"}))
    assert load_policy(y) == load_policy(j) == Policy(clip_norm=0.5, norm_scope="per_tensor")


def test_file_errors_validate_like_mappings(tmp_path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[safeopt]\nclip_nrom = 1.0\n")
    with pytest.raises(PolicyError, match="clip_norm"):
        load_policy(f)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.toml")
    g = tmp_path / "broken.json"
    g.write_text("{not json")
    with pytest.raises(PolicyError, match="Cannot parse"):
        load_policy(g)


def test_yaml_cannot_execute_code(tmp_path) -> None:
    f = tmp_path / "evil.yaml"
    f.write_text("clip_norm: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(PolicyError, match="Cannot parse"):
        load_policy(f)


def test_environment_variable(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert load_policy(None) == Policy()
    monkeypatch.setenv(ENV_VAR, "off")
    assert load_policy(None).is_noop
    f = tmp_path / "p.toml"
    f.write_text("clip_value = 0.25\n")
    monkeypatch.setenv(ENV_VAR, str(f))
    assert load_policy(None).clip_value == 0.25
    monkeypatch.setenv(ENV_VAR, '{"clip_norm": 3}')
    assert load_policy(None).clip_norm == 3.0
    monkeypatch.setenv(ENV_VAR, '{"clip_nrom": 3}')
    with pytest.raises(PolicyError, match=r"^\$SAFEOPT_CONFIG: .*clip_norm"):
        load_policy(None)
    monkeypatch.setenv(ENV_VAR, "strcit")
    with pytest.raises(PolicyError, match=r"^\$SAFEOPT_CONFIG: .*did you mean 'strict'"):
        load_policy(None)
    monkeypatch.setenv(ENV_VAR, "  ")
    with pytest.raises(PolicyError, match="set but empty"):
        load_policy(None)


def test_inline_json_is_a_policy_wherever_a_string_is() -> None:
    assert load_policy('{"clip_norm": 2, "clip_value": 0.5}').clip_value == 0.5
    with pytest.raises(PolicyError, match="inline JSON policy is invalid"):
        load_policy('{"clip_norm": 2,')


def test_replace_and_round_trip() -> None:
    p = Policy(clip_value=0.5)
    assert Policy(**p.to_dict()) == p
    assert p.replace(l2=0.1).l2 == 0.1
    with pytest.raises(PolicyError, match="clip_value"):
        p.replace(clip_valu=1.0)


def test_rejects_unsupported_policy_type() -> None:
    with pytest.raises(PolicyError, match="Received: policy=42"):
        load_policy(42)  # type: ignore[arg-type]
