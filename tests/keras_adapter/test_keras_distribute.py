"""tf.distribute: decisions on all-reduced gradients, the same on every replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safeopt.testing.cases import STREAK

keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute needs the TensorFlow backend", allow_module_level=True)

SCRIPT = Path(__file__).with_name("_mirrored_run.py")


@pytest.fixture(scope="module")
def mirrored() -> dict:
    """Runs the MirroredStrategy script over 2 logical CPU devices once."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decisions_are_taken_on_the_all_reduced_gradients(mirrored: dict) -> None:
    assert mirrored["replicas"] == 2
    # safeopt clips the summed gradients: 2 replicas == 1 device on the whole batch ...
    assert mirrored["norm_clips_mirror"] == mirrored["norm_clips_single"] > 0
    assert mirrored["safe_mirror_vs_single"] < 1e-6
    # ... whereas Keras's own global_clipnorm clips each replica's gradients before the sum.
    assert mirrored["native_mirror_vs_single"] > 1e-3
    # The loss fit hands over (through scale_loss) is each replica's share: summed, the mean.
    assert mirrored["last_loss_mirror"] == pytest.approx(mirrored["last_loss_single"], rel=1e-5)


def test_nan_in_one_replica_skips_everywhere(mirrored: dict) -> None:
    assert mirrored["nan_stats"] == {"skips": 2, "nonfinite": 2, "steps": 4}
    assert mirrored["nan_finite"]
    assert mirrored["nan_vs_left_out"] < 1e-6
    assert all(mirrored["replicas_equal"])


def test_a_nan_streak_in_the_replicas_recovers_on_every_replica(mirrored: dict) -> None:
    stats = mirrored["recover_stats"]
    assert stats == mirrored["recover_stats_single"]  # the same decisions as on one device
    assert stats["recoveries"] == 1
    assert stats["last_recovery"] == {"at": 4, "restored_to": 2, "cause": [STREAK]}
    assert (stats["steps"], stats["skips"], stats["rolled_back"]) == (4, 2, 2)
    assert mirrored["recover_vs_single"] < 1e-6
    assert mirrored["recover_finite"]
    assert all(mirrored["replicas_equal"])

