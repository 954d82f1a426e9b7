"""Two processes on CPU (gloo): DDP and FSDP2 take the same decisions on every rank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch_dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.parametrize(("mode", "fused"), torch_dist_worker.CONFIGS,
                         ids=[f"{m.replace('fsdp', 'fsdp2')}-{'fused' if f else 'foreach'}"
                              for m, f in torch_dist_worker.CONFIGS])
def test_nan_on_one_rank_skips_everywhere(mode: str, fused: bool, two_ranks: Path) -> None:
    results = [r[f"{mode}-{fused}"] for r in torch_dist_worker.load(two_ranks, "ddp_fsdp", 2)]
    for result in results:
        stats = result["stats"]
        assert stats["skips"] == 1
        assert stats["nonfinite"] == 1
        assert stats["steps"] == torch_dist_worker.STEPS - 1
        # the global norm is over all shards: it matches torch's own total norm
        assert stats["last_norm"] == pytest.approx(result["norms"][-1], rel=1e-5)
        assert math.isnan(result["norms"][torch_dist_worker.POISONED_STEP])
        assert all(torch.isfinite(p).all() for p in result["params"])
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
    assert str(results[0]["norms"]) == str(results[1]["norms"])


def test_a_loss_bad_on_one_rank_skips_on_every_rank(two_ranks: Path) -> None:
    results = torch_dist_worker.load(two_ranks, "loss_on_one_rank", 2)
    for result in results:
        stats = result["stats"]
        assert (stats["skips"], stats["nonfinite"]) == (1, 1)  # the same step on both ranks
        # the loss the policy saw is the ranks' mean, the same everywhere
        assert stats["last_loss"] == pytest.approx(
            sum(r["losses"][-1] for r in results) / 2, rel=1e-6)
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)  # the replicas did not drift apart
