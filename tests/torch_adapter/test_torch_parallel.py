"""The model split over processes: pipeline stages, FSDP2 x tensor parallel, both with FSDP2.

Each run is compared step by step with one process training the whole
model on the same data (``torch_parallel_worker.reference``): the skip, the
global norm, the clip scale and every counter are the whole model's, on
every rank of every stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch_dist_worker
import torch_parallel_worker as pw
from torch_helpers import model

import safeopt
from safeopt_torch import SafeOptimizer

gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                          reason="torch.distributed with gloo is not available")

CASES = [(job, world, config) for job, world in (("pipeline", 2), ("tp_fsdp", 4),
                                                 ("pp_fsdp", 4))
         for config in pw.CONFIGS[job]]


@gloo
@pytest.mark.parametrize(("job", "world", "config"), CASES,
                         ids=[f"{job}-{config[0]}" for job, _, config in CASES])
def test_every_rank_decides_as_one_process_on_the_whole_model(
        job: str, world: int, config: tuple[str, bool, dict[str, Any], str],
        request: pytest.FixtureRequest) -> None:
    name, fused, policy, _ = config
    out: Path = request.getfixturevalue("two_ranks" if world == 2 else "four_ranks")
    runs = [result[name] for result in torch_dist_worker.load(out, job, world)]
    want = pw.reference(job, fused, policy)
    assert want["history"][pw.POISONED]["skips"] == 1  # the poisoned step is skipped
    for run in runs:
        assert run["history"] == runs[0]["history"]  # the same decisions, bit for bit
        for got, expected in zip(run["history"], want["history"]):
            for key, value in expected.items():
                if isinstance(value, int):
                    assert got[key] == value, key
                else:
                    assert got[key] == pytest.approx(value, rel=1e-5), key
        first = run["first_param"]
        for p, q in zip(run["params"], want["params"][first:]):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        if job == "pipeline":  # a deep copy of the wrapper shares the process group
            assert run["copy_shares_group"]
        if job != "tp_fsdp":  # a stage holds its own layers only
            assert len(run["params"]) == len(want["params"]) // 2


@gloo
def test_layouts_safeopt_cannot_reduce_are_refused(two_ranks: Path) -> None:
    for errors in torch_dist_worker.load(two_ranks, "refusals", 2):
        assert errors["replicated gradient"].startswith(
            "safeopt needs each DTensor gradient laid out like its parameter")
        assert "(Shard(dim=0),) and its gradient with (Replicate(),)" in errors[
            "replicated gradient"]
        assert "its gradient with (Partial(sum),)" in errors["partial"]
        assert errors["2-D mesh"].startswith("`pipeline_group` must be a 1-D DeviceMesh")


def test_pipeline_group_is_checked() -> None:
    opt = SafeOptimizer(torch.optim.SGD(model().parameters(), lr=0.1), _policy())
    assert opt.pipeline_group is None
    with pytest.raises(TypeError, match=r"`pipeline_group` must be a torch.distributed "
                                        r"ProcessGroup.*Received: pipeline_group=3"):
        opt.pipeline_group = 3
    with pytest.raises(TypeError, match="Received: pipeline_group='pp'"):
        SafeOptimizer(torch.optim.SGD(model().parameters(), lr=0.1), _policy(),
                      pipeline_group="pp")


def _policy() -> safeopt.Policy:
    return safeopt.Policy()
