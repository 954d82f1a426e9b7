"""Pipeline stages: one decision for a model whose parameters are split over processes.

Under pipeline parallelism each stage's optimizer holds only that stage's
parameters, so the statistics a step gathers are the stage's. torchtitan's
``clip_grad_norm_`` raises each stage's total norm to the power ``p`` and
all-reduces it over the pipeline mesh (``pp_mesh``) before clipping;
:class:`Stages` does the same with every statistic safeopt's decision reads
(the squared norms, the largest ``|g|``, the clip flag of a local scope, the
loss), so every rank of every stage takes the same decision on the same
step. The per-tensor statistics (the per-layer monitor) stay the stage's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import safeopt.adapter as sa

DeviceMesh: Any
try:  # absent from builds without torch.distributed
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # pragma: no cover - such builds are rare
    DeviceMesh = None


def pipeline_group(value: Any) -> Any:
    """``value`` as a process group (a 1-D ``DeviceMesh`` gives its group), or ``None``."""
    if value is None:
        return None
    if DeviceMesh is not None and isinstance(value, DeviceMesh):
        if value.ndim != 1:
            raise ValueError(
                "`pipeline_group` must be a 1-D DeviceMesh (the pipeline dimension). Received: "
                f"pipeline_group={value!r} with {value.ndim} dimensions; pass mesh['pp'].")
        return value.get_group()
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    raise TypeError(
        "`pipeline_group` must be a torch.distributed ProcessGroup, a 1-D DeviceMesh (e.g. "
        f"torchtitan's pp_mesh) or None. Received: pipeline_group={value!r}")


class Stages:
    """The process group over the pipeline stages that share one model.

    Args:
      group: The group (one rank per stage, of one data-parallel replica).
    """

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> Stages:
        return self  # a process group is a handle of the process: copies share it

    def combine(self, stats: sa.GradStats, device: torch.device) -> sa.GradStats:
        """The statistics of the whole model from the stages' (one all-gather).

        The squared norms are summed over the stages, in stage order (the
        same float32 sums on every rank), the largest ``|g|`` and the clip
        flag reduced by ``max``; the loss is that of the first stage given
        one (a pipeline schedule computes it on one stage only).
        """
        f32 = torch.float32
        raw = stats.norm if stats.raw_norm is None else stats.raw_norm
        squared = {"raw_norm": raw}
        if stats.norm is not raw:
            squared["norm"] = stats.norm
        if stats.weight_norm is not None:
            squared["weight_norm"] = stats.weight_norm
        # finite: the smallest over the stages (all finite); the others the largest
        extreme = {name: getattr(stats, name) for name in ("max_abs", "clipped", "finite")
                   if getattr(stats, name) is not None}
        given = stats.loss is not None
        zero = torch.zeros((), dtype=f32, device=device)
        columns = [_f32(v, device) ** 2 for v in squared.values()]
        columns += [_f32(v, device) for v in extreme.values()]
        columns += [_f32(stats.loss, device) if given else zero,
                    torch.ones((), dtype=f32, device=device) if given else zero]
        rows = self._gather(torch.stack(columns))
        out: dict[str, Any] = {}
        for i, (name, value) in enumerate(squared.items()):
            out[name] = torch.sqrt(rows[:, i].sum()).to(value.dtype)
        if "norm" not in out:
            out["norm"] = out["raw_norm"]
        for i, (name, value) in enumerate(extreme.items(), start=len(squared)):
            top = rows[:, i].amin() if name == "finite" else rows[:, i].amax()
            out[name] = top > 0 if value.dtype == torch.bool else top.to(value.dtype)
        out["loss"] = _first_loss(rows[:, -2], rows[:, -1], given)
        return stats._replace(**out)

    def any(self, flag: Tensor) -> Tensor:
        """Whether ``flag`` (float32 0-d, 0 or 1) is set on any stage."""
        out = flag.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return out

    def _gather(self, row: Tensor) -> Tensor:
        """Every stage's ``row``, stacked in the group's rank order."""
        parts = [torch.empty_like(row) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, row, group=self.group)
        return torch.stack(parts)


def _f32(value: Any, device: torch.device) -> Tensor:
    return torch.as_tensor(value).to(device, torch.float32).reshape(())


def _first_loss(values: Tensor, given: Tensor, given_here: bool) -> Tensor | None:
    """The loss of the first stage given one; ``None`` when no stage was.

    A stage given a loss knows there is one; a stage given none reads
    whether another was (a host read of one flag, free on CPU).
    """
    if not given_here and not bool(given.amax() > 0):
        return None
    first = torch.logical_and(given > 0, torch.cumsum(given, 0) == 1)
    return torch.where(first, values, torch.zeros_like(values)).sum()


def mean_over_ranks(loss: Tensor) -> Tensor:
    """``loss`` averaged over every rank of the default process group (as is outside one).

    Data parallelism gives each rank the loss of its own batch, while the
    gradients the decision reads are the same everywhere (all-reduced by DDP,
    summed over the shards under FSDP2). The loss-based rules (``spike_skip=
    "loss"``, a NaN/Inf loss, recovery's patience, the loss signs) would then
    decide differently on different ranks and the replicas would drift apart;
    one all-reduce of the loss keeps the decision the same on every rank.
    Every rank must pass a loss on the same steps (as backward under DDP must
    run on every rank). A NaN/Inf loss on one rank makes the mean non-finite:
    every rank skips, as with a NaN gradient. (The compiled step takes the
    loss as given: under ``torch.compile`` pass the replicas' mean yourself.)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return loss
    total = loss.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()
