"""DTensors in a state dict: which part of each one this rank holds, and whether it writes it.

Every rank holds one box of each DTensor (its chunk: global offsets and sizes). Ranks that
differ only on mesh dimensions where the DTensor is replicated hold the same box; exactly one of
them writes it: the one at coordinate 0 on each of those dimensions. That is decided by each
rank alone, from its own mesh coordinate, with no collective. Plain tensors and other values of a
sharded state dict are taken to be the same on every rank, as DCP takes them, and rank 0 writes
them. A DTensor that is Partial (a sum still to be reduced) or has a placement this code does
not know is refused before anything is written.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from . import torch_internals
from .errors import UnsupportedStateError


def is_dtensor(value: Any) -> bool:
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    # (Not imported yet: nothing can be a DTensor, and importing it costs 0.7 s of CPU.)
    return dtensor_module is not None and isinstance(value, dtensor_module.DTensor)


def writes_chunk(dtensor: Any, fqn: str) -> bool:
    """Whether this rank writes its chunk of `dtensor` (see the module docstring)."""
    coordinate = dtensor.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the DTensor's mesh
        return False
    writes = True
    for dim, placement in enumerate(dtensor.placements):
        if placement.is_partial():
            raise UnsupportedStateError(
                f"cannot checkpoint {fqn!r}: it is a DTensor with a Partial placement on mesh dimension {dim} (a sum "
                "still to be reduced across ranks). Reduce it first: dtensor.redistribute(placements=[Replicate()])"
            )
        if placement.is_replicate():
            writes = writes and coordinate[dim] == 0
        elif not (placement.is_shard() or torch_internals.is_strided_shard(placement)):
            raise UnsupportedStateError(
                f"cannot checkpoint {fqn!r}: its DTensor placement {placement!r} on mesh dimension {dim} is not one "
                "async-ckpt knows (Shard, Replicate); redistribute it to those first"
            )
    return writes


def local_chunk(dtensor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offsets, sizes) of this rank's chunk of `dtensor`."""
    return torch_internals.local_chunk(dtensor)


def local_part(dtensor: Any) -> torch.Tensor:
    """This rank's chunk of `dtensor` as a plain tensor (no copy)."""
    local: torch.Tensor = dtensor.to_local()
    return local
