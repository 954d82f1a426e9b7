"""The `safeopt check` and `safeopt adapters` commands."""

from __future__ import annotations

import json

from safeopt.cli import main


def test_check_prints_a_valid_policy(capsys) -> None:
    assert main(["check", "strict"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "clip_value" in out and "0.5" in out


def test_check_json(capsys, tmp_path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[safeopt]\nclip_norm = 0.25\n")
    assert main(["check", str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clip_norm"] == 0.25


def test_check_reports_bad_config(capsys, tmp_path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[safeopt]\nclip_norm = -1\n")
    assert main(["check", str(f)]) == 2
    err = capsys.readouterr().err
    assert "clip_norm" in err and "-1" in err


def test_check_takes_the_inline_json_that_the_environment_variable_takes(capsys) -> None:
    assert main(["check", '{"clip_norm": 1}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clip_norm"] == 1.0


def test_check_names_the_environment_variable(capsys, monkeypatch) -> None:
    monkeypatch.setenv("SAFEOPT_CONFIG", '{"clip_nrom": 1}')
    assert main(["check"]) == 2
    assert "$SAFEOPT_CONFIG" in capsys.readouterr().err


def test_adapters_lists_entry_points(capsys) -> None:
    assert main(["adapters"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "optax" in out and "keras" in out
    # a framework not imported is told apart from one not installed
    assert "loads when you import it" in out or "not installed" in out
