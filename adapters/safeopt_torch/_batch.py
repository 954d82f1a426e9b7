"""The parameters that have a gradient this step, grouped by device and dtype.

:func:`collect` gathers them (the local shards of FSDP2's ``DTensor``
parameters, with the reduction across the ranks that hold the shards) into a
:class:`Batch`, which :class:`safeopt_torch._kernels.TorchKernels` reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DTensor: Any
try:  # DTensor is absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - such builds are rare
    DTensor = None

Groups = list[tuple[torch.device | None, list[int]]]


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (an alias, writes reach it), else ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


@dataclasses.dataclass
class Batch:
    """The parameters that have a gradient this step, in parameter order.

    Attributes:
      params: The parameters (DTensors as they are).
      local_params: Their local tensors.
      grads: Local gradient tensors (written in place by the policy).
      index: Position of each entry among all the optimizer's parameters.
      groups: ``(device, positions)`` per device/dtype group of ``grads``.
      shard: Reduction over ranks for DTensor shards (``None`` when no
        parameter is sharded).
    """

    params: list[Tensor]
    local_params: list[Tensor]
    grads: list[Tensor]
    index: list[int]
    groups: Groups
    shard: ShardReduce | None

    def split(self, tensors: list[Tensor]) -> list[list[Tensor]]:
        """``tensors`` (batch order) split into the device/dtype groups."""
        if len(self.groups) == 1:
            return [tensors]
        return [[tensors[i] for i in pos] for _, pos in self.groups]


@dataclasses.dataclass
class ShardReduce:
    """How to sum per-tensor statistics of DTensor shards across ranks.

    Attributes:
      groups: Process groups of the mesh dimensions the tensors are sharded on.
      mask: float32 1-d, 1 where the batch entry is a DTensor shard (plain
        tensors are replicated and must not be summed); ``None`` when all are.
    """

    groups: list[Any]
    mask: Tensor | None

    def sum(self, values: Tensor) -> Tensor:
        """All-reduces (SUM) ``values`` (per batch entry) over the shard groups."""
        part = values if self.mask is None else values * self.mask
        part = part.clone()
        for group in self.groups:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        if self.mask is None:
            return part
        return torch.where(self.mask > 0, part, values)

    def max(self, value: Tensor) -> Tensor:
        """All-reduces (MAX) a 0-d ``value`` over the shard groups."""
        out = value.clone()
        for group in self.groups:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out


def collect(param_groups: list[dict[str, Any]], device: torch.device, sharded: bool) -> Batch:
    """Gathers the parameters that have a gradient, grouped by device and dtype.

    Args:
      param_groups: The optimizer's parameter groups.
      device: Where safeopt's state lives.
      sharded: Whether any parameter is a DTensor (checked once by the caller).
    """
    params: list[Tensor] = []
    grads: list[Tensor] = []
    index: list[int] = []
    position = 0
    for group in param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None:
                params.append(p)
                grads.append(g)
                index.append(position)
            position += 1
    if any(g.is_sparse for g in grads):
        raise TypeError(
            "safeopt does not support sparse gradients. Received: a sparse gradient; use a "
            "dense embedding (sparse=False) or leave that parameter out of the wrapper."
        )
    if sharded:
        local_params = [local(p) for p in params]
        local_grads = [local(g) for g in grads]
    else:
        local_params, local_grads = params, grads
    return Batch(params, local_params, local_grads, index, _groups(local_grads),
                 _shard_reduce(params, device) if sharded else None)


def _groups(grads: list[Tensor]) -> Groups:
    """Positions of ``grads`` per device/dtype (one group without the grouping call if uniform)."""
    if not grads:
        return []
    first = grads[0]
    device, dtype = first.device, first.dtype
    if torch.compiler.is_compiling() or all(
            g.dtype == dtype and g.device == device for g in grads):
        return [(None if torch.compiler.is_compiling() else device, list(range(len(grads))))]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        [list(grads)], with_indices=True)
    return [(key[0], list(pos)) for key, (_, pos) in grouped.items()]


def any_dtensor(param_groups: list[dict[str, Any]]) -> bool:
    """Whether any parameter of ``param_groups`` is a DTensor (FSDP2)."""
    return DTensor is not None and any(
        isinstance(p, DTensor) for group in param_groups for p in group["params"])


def _shard_reduce(params: list[Tensor], device: torch.device) -> ShardReduce | None:
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return None
    keys = set()
    for p in params:
        if is_dtensor(p):
            dims = tuple(d for d, pl in enumerate(p.placements)  # type: ignore[attr-defined]
                         if pl.is_shard())
            keys.add((id(p.device_mesh), dims))  # type: ignore[attr-defined]
    if len(keys) != 1:
        raise NotImplementedError(
            "safeopt needs every DTensor parameter on one device mesh with the same sharded "
            f"mesh dimensions. Received: {len(keys)} different (mesh, sharded dims) layouts; "
            "wrap one optimizer per mesh."
        )
    first = next(p for p in params if is_dtensor(p))
    (_, dims), = keys
    groups = [first.device_mesh.get_group(d) for d in dims]  # type: ignore[attr-defined]
    mask = None
    if not all(sharded):
        mask = torch.tensor([float(s) for s in sharded], dtype=torch.float32, device=device)
    return ShardReduce(groups, mask)
