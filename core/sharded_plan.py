"""Capture of a sharded state dict (one holding DTensors): the items this rank writes.

The state dict is flattened as DCP flattens it (`model.0.weight`, `optim.state.0.weight.exp_avg`,
`optim.param_groups.0.lr`). Each leaf becomes at most one item of this rank's file:

- a DTensor: this rank's chunk (global offsets and sizes), when this rank writes it (see sharding.py);
- a plain tensor: the whole tensor, written by rank 0;
- any other value: its torch.save bytes (what DCP calls a bytes item), written by rank 0.

Tensor bytes are staged into the slab as contiguous arrays; bytes items travel in the plan.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import torch_internals
from .capture import check_tensor
from .errors import UnsupportedStateError
from .plan import CapturedState, bytes_of, planned
from .sharding import is_dtensor, local_chunk, local_part, writes_chunk

FORMAT = "dcp"


@dataclass(frozen=True)
class ShardedItem:
    """One item of a rank's file. Tensor items: `dtype`, the tensor's global `size`, the chunk's
    `offsets` and `sizes`, and `storage`, the index of its bytes among the plan's storages.
    Bytes items: `payload`, torch.save's bytes of the value."""

    fqn: str
    dtype: torch.dtype | None = None
    size: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None
    sizes: tuple[int, ...] | None = None
    storage: int | None = None
    payload: bytes | None = None

    @property
    def is_tensor(self) -> bool:
        return self.payload is None


@dataclass(frozen=True)
class ShardedStructure:
    """The plan's structure for a sharded file: this rank's items, and (on rank 0) how the flat
    names map back to the nested state dict (DCP's planner_data)."""

    items: tuple[ShardedItem, ...]
    mapping: dict[str, tuple[Any, ...]]

    def encode(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def decode(structure: bytes) -> ShardedStructure:
        decoded = pickle.loads(structure)
        assert isinstance(decoded, ShardedStructure)
        return decoded


def capture_sharded(state_dict: Any, rank: int) -> CapturedState:
    """Plan this rank's part of a sharded checkpoint of `state_dict` (see the module docstring)."""
    flat, mapping = torch_internals.flatten_state_dict(state_dict)
    items: list[ShardedItem] = []
    sources: list[torch.Tensor] = []
    for fqn, value in flat.items():
        if isinstance(value, torch.Tensor):
            item, source = _tensor_item(fqn, value, rank, len(sources))
            if item is not None and source is not None:
                items.append(item)
                sources.append(source)
        elif rank == 0:
            items.append(ShardedItem(fqn, payload=_saved_bytes(fqn, value)))
    structure = ShardedStructure(tuple(items), dict(mapping) if rank == 0 else {})
    return planned(structure.encode(), sources, FORMAT)


def _tensor_item(
    fqn: str, value: torch.Tensor, rank: int, storage: int
) -> tuple[ShardedItem | None, torch.Tensor | None]:
    if is_dtensor(value):
        if not writes_chunk(value, fqn):
            return None, None
        offsets, sizes = local_chunk(value)
        local = local_part(value)
        size = tuple(value.shape)
    else:
        if rank != 0:
            return None, None
        local, size = value, tuple(value.shape)
        offsets, sizes = (0,) * len(size), size
    check_tensor(local)
    if local.numel() == 0:
        if math.prod(size) != 0 or rank != 0:
            return None, None  # other ranks' chunks cover a non-empty tensor; rank 0 records an empty one
        offsets, sizes = (0,) * len(size), size
    local = local.detach()
    if not local.is_contiguous():
        local = local.contiguous()  # the file holds each chunk contiguous, as torch.save of it would
    nbytes = local.numel() * local.element_size()
    source = bytes_of(local.untyped_storage(), int(local.storage_offset()) * local.element_size(), nbytes)
    return ShardedItem(fqn, local.dtype, size, tuple(offsets), tuple(sizes), storage), source


def _saved_bytes(fqn: str, value: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
    except Exception as exc:
        raise UnsupportedStateError(
            f"cannot checkpoint {fqn!r}: its value cannot be saved ({type(exc).__name__}: {exc})"
        ) from exc
    return buffer.getvalue()


def materialize_sharded(structure: bytes, storages: Sequence[torch.UntypedStorage]) -> dict[str, Any]:
    """What this rank's file holds, by DCP's flat names: each chunk it writes as a plain tensor
    (its part of the DTensor, not the DTensor), and the values rank 0 writes."""
    flat: dict[str, Any] = {}
    for item in ShardedStructure.decode(structure).items:
        if item.is_tensor:
            assert item.storage is not None and item.dtype is not None and item.sizes is not None
            chunk = torch.empty(0, dtype=torch.uint8).set_(storages[item.storage])
            flat[item.fqn] = chunk.view(item.dtype).reshape(item.sizes)
        else:
            assert item.payload is not None
            flat[item.fqn] = torch.load(io.BytesIO(item.payload), weights_only=False)
    return flat
