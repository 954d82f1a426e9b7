"""The parameters that have a gradient this step, grouped by device and dtype.

:func:`collect` gathers them (the local shards of ``DTensor`` parameters,
FSDP2's and tensor parallelism's, with the reduction of each tensor's
statistics over the ranks that hold its shards) into a :class:`Batch`,
which :class:`safeopt_torch._kernels.TorchKernels` reads.

Distributed: under DDP the gradients are already averaged, so every rank
takes the same decision (a NaN on one rank reaches all of them through the
all-reduce). Under FSDP2 (``fully_shard``, DTensor parameters), alone or
with tensor parallelism on a 2-D mesh, each tensor's squared norm on the
local shard is summed over the process groups of the mesh dimensions that
tensor is split on (FSDP2's ``Shard`` and ``_StridedShard``, tensor
parallelism's ``Shard``), and over none it is replicated on: one
all-reduce of a small vector per group (a max all-reduce for
``clip_value``), so the global norm, the skip flag and the clip scale are
the whole model's on every rank. Under pipeline parallelism each stage's
optimizer holds its stage's parameters: declare the group that joins the
stages (:attr:`safeopt_torch.SafeOptimizer.pipeline_group`) and every step combines the
stages' statistics over it, as torchtitan's ``clip_grad_norm_`` reduces the
norm over ``pp_mesh``. A gradient whose layout differs from its
parameter's, or with a ``Partial`` placement, is refused. Known limit:
``norm_scope="unitwise"`` computes unit norms on the local shards, so a
tensor split along another dimension than its first (a sharded bias, a
row-wise tensor-parallel weight) is clipped shard by shard.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor`` if that module is imported, else ``None``.

    A DTensor exists only once its module is imported, so nothing imports it
    here: importing it costs about a second (it pulls in ``torch._dynamo``),
    which a model without DTensors would pay at its first ``wrap``.
    """
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


Groups = list[tuple[torch.device | None, list[int]]]

_MAX_LAYOUTS = 16  # shard reductions kept between steps


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


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

    Each batch entry is summed over the process groups of the mesh
    dimensions it is sharded on (``Shard`` placements, FSDP2's
    ``_StridedShard`` included), and over no others: under FSDP2 x tensor
    parallel a row-wise weight is summed over both mesh dimensions, a
    column-wise bias replicated over the tensor-parallel dimension only over
    the data-parallel one, and a plain tensor (replicated) over none.

    Attributes:
      groups: The process groups, in an order every rank shares.
      masks: Per group, float32 1-d, 1 where the batch entry is sharded over
        it; ``None`` when every entry is.
    """

    groups: list[Any]
    masks: list[Tensor | None]

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardReduce:
        return self  # process groups are handles of the process; the masks never change

    def sum(self, values: Tensor) -> Tensor:
        """All-reduces (SUM) ``values`` (per batch entry) over each entry's shard groups."""
        for group, mask in zip(self.groups, self.masks):
            part = values.clone() if mask is None else values * mask
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            values = part if mask is None else torch.where(mask > 0, part, values)
        return values

    def max(self, value: Tensor) -> Tensor:
        """All-reduces (MAX) a 0-d ``value`` over every shard group (replicas agree)."""
        out = value.clone()
        for group in self.groups:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out


def collect(param_groups: list[dict[str, Any]], device: torch.device, sharded: bool,
            cache: dict[Any, Any] | None = None) -> Batch:
    """Gathers the parameters that have a gradient, grouped by device and dtype.

    Args:
      param_groups: The optimizer's parameter groups.
      device: Where safeopt's state lives.
      sharded: Whether any parameter is a DTensor (checked once by the caller).
      cache: Where the shard reductions are kept between steps (their masks
        are built once per set of parameters); ``None`` builds them anew.
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
    if not sharded:
        return Batch(params, params, grads, index, _groups(grads), None)
    local_grads = [local(g) for g in grads]
    return Batch(params, [local(p) for p in params], local_grads, index, _groups(local_grads),
                 _cached_shard_reduce(params, grads, device, cache))


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
    dtensor = dtensor_type()
    return dtensor is not None and any(
        isinstance(p, dtensor) for group in param_groups for p in group["params"])


def _cached_shard_reduce(params: list[Tensor], grads: list[Tensor], device: torch.device,
                        cache: dict[Any, Any] | None) -> ShardReduce | None:
    if cache is None:
        return _shard_reduce(params, grads, device)
    key = ("shard", device, *(_layout_key(p, g) for p, g in zip(params, grads)))
    if key not in cache:
        if len(cache) >= _MAX_LAYOUTS:  # the parameters that have a gradient keep changing
            cache.clear()
        cache[key] = _shard_reduce(params, grads, device)
    return cache[key]


def _layout_key(p: Tensor, g: Tensor) -> tuple[Any, ...]:
    if not is_dtensor(p):
        return (id(p),)
    return (id(p), id(p.device_mesh), tuple(p.placements),  # type: ignore[attr-defined]
            tuple(g.placements) if is_dtensor(g) else None)  # type: ignore[attr-defined]


def _split(placement: Any) -> bool:
    """Whether a placement splits the tensor over its mesh dimension.

    ``Shard`` and FSDP2's ``_StridedShard`` (which is not a ``Shard`` and
    whose ``is_shard()`` is false in recent torch) do; ``Replicate`` does not.
    """
    return not (placement.is_replicate() or placement.is_partial())


def _shard_groups(p: Tensor, g: Tensor) -> list[Any]:
    """The process groups of the mesh dimensions ``p`` is split over (checked against ``g``)."""
    placements = tuple(p.placements)  # type: ignore[attr-defined]
    grad = tuple(g.placements) if is_dtensor(g) else None  # type: ignore[attr-defined]
    if any(pl.is_partial() for pl in placements + (grad or ())) or (
            grad is not None and grad != placements):
        raise NotImplementedError(
            "safeopt needs each DTensor gradient laid out like its parameter, with no Partial "
            f"placement. Received: a parameter with placements {placements} and its gradient "
            f"with {grad}; redistribute the gradient to the parameter's placements before "
            "opt.step()."
        )
    mesh = p.device_mesh  # type: ignore[attr-defined]
    return [mesh.get_group(dim) for dim, pl in enumerate(placements) if _split(pl)]


def _shard_reduce(params: list[Tensor], grads: list[Tensor],
                  device: torch.device) -> ShardReduce | None:
    """The reduction of each parameter's statistics over the groups it is sharded on."""
    groups: dict[int, Any] = {}  # by id, in the order of the first parameter that uses it
    members: list[set[int]] = []  # per parameter, the ids of its shard groups
    for p, g in zip(params, grads):
        found = _shard_groups(p, g) if is_dtensor(p) else []
        for group in found:
            groups.setdefault(id(group), group)
        members.append({id(group) for group in found})
    if not groups:
        return None
    masks: list[Tensor | None] = []
    for key in groups:
        inside = [key in ids for ids in members]
        masks.append(None if all(inside) else torch.tensor(
            [float(s) for s in inside], dtype=torch.float32, device=device))
    return ShardReduce(list(groups.values()), masks)
