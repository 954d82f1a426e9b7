"""The language-model stability benchmark: its data, its spike count and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from safeopt.cli import main
from safeopt_bench import lm, lm_report, text


def test_corpus_is_the_fixed_stdlib_files_split_deterministically() -> None:
    first, again = text.load(), text.load()
    assert [f["module"] for f in first.files] == list(text.MODULES)
    assert first.sha256 == again.sha256 and (first.train == again.train).all()
    total = sum(f["bytes"] for f in first.files)
    assert first.train.size + first.val.size == total
    # About one block in ten is validation (the last block of a file may be short).
    assert 0.07 < first.val.size / total < 0.11
    # Real text: Python source, mostly printable ASCII.
    assert b"def " in first.train.tobytes() and b"import " in first.val.tobytes()


def test_missing_stdlib_source_names_the_file_and_the_remedy(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`argparse`.*argparse\.py.*ships"):
        text.source_file("argparse", root=tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("x = 1\n")
    assert text.source_file("pkg", root=tmp_path).name == "__init__.py"


def test_spikes_are_losses_k_sigma_above_the_running_mean() -> None:
    noise = [2.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(200)]  # std ~0.014
    assert lm_report.spike_steps(noise) == []
    spiky = list(noise)
    spiky[120] = 2.5  # ~35 sigma
    spiky[121] = 3.0  # still above the statistics that now hold 2.5: the same spike
    spiky[160] = math.nan  # NaN is counted apart, never a spike
    steps = lm_report.spike_steps(spiky)
    assert steps == [120, 121]
    assert lm_report.spike_onsets(steps) == [120]
    # Too little history: nothing is a spike before SPIKE_MIN_HISTORY losses.
    short = [1.0 + 0.01 * (i % 2) for i in range(lm_report.SPIKE_MIN_HISTORY)]
    assert lm_report.spike_steps([*short[:-1], 9.0]) == []
    assert lm_report.spike_steps([*short, 9.0]) == [lm_report.SPIKE_MIN_HISTORY]


def test_schedule_warms_up_then_decays_to_the_final_fraction() -> None:
    hyper = {**lm.HYPER, "steps": 100, "warmup": 10, "final_lr_fraction": 0.1}
    factors = [lm.schedule(s, hyper) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    decay = factors[9:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_recovery_joins_the_configurations_once_the_policy_has_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    has_recover = "recover" in {f.name for f in dataclasses.fields(lm.safeopt.Policy)}
    assert ("safeopt recovery" in lm.configurations()) == has_recover
    monkeypatch.setattr(lm, "policy_accepts", lambda key: True)
    assert "safeopt recovery" in lm.configurations()
    monkeypatch.setattr(lm, "policy_accepts", lambda key: key != "recover")
    names = list(lm.configurations())
    assert "safeopt recovery" not in names
    assert names[:2] == ["none", "clip_grad_norm_(1.0)"]
    assert {"safeopt default", "safeopt adaptive", "safeopt spike skipping"} <= set(names)


def test_quick_lm_stability_writes_table_json_and_curves(tmp_path: Path) -> None:
    assert main(["bench", "--stability", "--quick", "--tasks", "lm", "--out",
                 str(tmp_path)]) == 0
    data = json.loads((tmp_path / "lm_stability.json").read_text())
    configs = {s["config"] for s in data["summary"]}
    assert set(lm.configurations()) == configs
    assert data["spike"] == {"window": lm_report.SPIKE_WINDOW, "k": lm_report.SPIKE_K}
    assert [f["module"] for f in data["data"]["files"]] == list(text.MODULES)
    for run in data["runs"]:
        assert len(run["losses"]) == lm.QUICK["steps"] == run["steps"]
        assert math.isfinite(run["val_loss"]) and run["val_loss"] < math.log(256) + 0.5
        assert run["first_nan_step"] is None and run["spikes"] == 0
        assert (run["safeopt"] is not None) == run["config"].startswith("safeopt")
    by = {s["config"]: s for s in data["summary"]}
    assert by["safeopt default"]["skipped_updates"] == [0]
    # Every configuration trains the same model on the same batches: the first loss agrees.
    assert len({round(r["losses"][0], 5) for r in data["runs"]}) == 1
    table = (tmp_path / "lm_stability.md").read_text()
    assert "| clip_grad_norm_(1.0) | 0/1 |" in table and "standard-library files" in table
    assert not (tmp_path / "stability.json").exists()  # only the task asked for
    pytest.importorskip("matplotlib")
    assert (tmp_path / "lm_stability.png").stat().st_size > 10_000


def test_an_episode_replaces_its_batches_with_random_bytes_for_every_config() -> None:
    corpus = text.load()
    plain = lm.Batches(corpus, 16, 4, seed=0)
    spoilt = lm.Batches(corpus, 16, 4, seed=0, episode=(3, 2))
    again = lm.Batches(corpus, 16, 4, seed=0, episode=(3, 2))
    for k in range(7):
        (x, _), (xs, _), (xa, _) = next(plain), next(spoilt), next(again)
        assert bool((xs == x).all()) == (k not in (3, 4)), k  # only batches 3 and 4 differ
        assert (xs == xa).all()  # the same corrupt bytes for every configuration
    # Corrupt bytes use the whole byte range; Python source is mostly printable ASCII.
    spoilt = lm.Batches(corpus, 64, 16, seed=0, episode=(0, 1))
    x, _ = next(spoilt)
    assert (x > 127).float().mean() > 0.4


def test_recovering_configurations_drop_the_batches_after_a_restore() -> None:
    hyper = {**lm.QUICK_EPISODE}
    batches = lm.Batches(text.load(), hyper["context"], hyper["batch"], 0, hyper["episode"])
    assert lm._stream(batches, None, hyper) is batches  # no safeopt: every batch
    model = lm.TinyLM(hyper["d_model"], hyper["layers"], hyper["heads"], hyper["context"],
                      hyper["init_std"])
    _, robust = lm.configurations()["safeopt robust"](model, lm.adamw(model, hyper))
    _, default = lm.configurations()["safeopt default"](model, lm.adamw(model, hyper))
    assert lm._stream(batches, default, hyper) is batches
    stream = lm._stream(batches, robust, hyper)
    assert stream is not batches and next(stream)[0].shape == (hyper["batch"], hyper["context"])


def test_quick_lm_episode_writes_its_own_table(tmp_path: Path) -> None:
    assert main(["bench", "--stability", "--quick", "--tasks", "lm-episode", "--out",
                 str(tmp_path)]) == 0
    data = json.loads((tmp_path / "lm_episode.json").read_text())
    assert data["hyper"]["episode"] == list(lm.QUICK_EPISODE["episode"])
    assert {s["config"] for s in data["summary"]} == set(lm.configurations())
    for run in data["runs"]:
        assert len(run["losses"]) == lm.QUICK_EPISODE["steps"]
        start, length = lm.QUICK_EPISODE["episode"]
        # the corrupt batches (uniform bytes: about log 256 nats) are seen unless skipped
        assert max(run["losses"][start:start + length]) > 4.0
    assert not (tmp_path / "lm_stability.json").exists()
