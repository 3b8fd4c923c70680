"""The plan of one checkpoint: what crosses from the trainer to the writer besides the bytes.

A plan is a file's structure (torch.save's pickle, or a safetensors header) and the place and
size of each storage's bytes. It is a few KiB and is all that crosses the pipe; the bytes go
through shared memory. `capture.py` and `safetensors_format.py` make plans, `rebuild.py` turns
a plan and its bytes back into a state dict, `plan_cache.py` reuses plans across saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .fsutil import PAGE_SIZE, round_up


@dataclass(frozen=True)
class StorageMeta:
    """One storage: record `data/<index>` in the file, at `slab_offset` in the staging slab."""

    slab_offset: int
    nbytes: int


@dataclass(frozen=True)
class Lineage:
    """Where an incremental save stands among the saves of one state-dict shape.

    `name` identifies the shape; `sequence` numbers this save, `previous` the save before it
    of the same shape (None for the first). `digests[i]` are storage i's chunk digests (of
    `chunk_bytes` each) when the stager computed them, else None. The writer copies chunks
    whose digest matches the previous file's from that file, if it committed `previous`.
    """

    name: str
    sequence: int
    previous: int | None
    chunk_bytes: int
    digests: tuple[list[str] | None, ...]


@dataclass
class CheckpointPlan:
    """Everything the writer needs besides the bytes.

    For format "torch", `structure` is torch.save's data.pkl; for "safetensors", the file's
    JSON header. `storages` lists the byte ranges, in the order the file holds them.
    `lineage` is set for incremental saves.
    """

    structure: bytes
    storages: list[StorageMeta]
    slab_nbytes: int
    format: str = "torch"
    lineage: Lineage | None = None

    @property
    def slab_shape(self) -> tuple[Any, ...]:
        """What makes two plans' slabs interchangeable: format and every storage's place and size."""
        return (self.format, self.slab_nbytes, tuple((s.slab_offset, s.nbytes) for s in self.storages))


@dataclass
class CapturedState:
    """A plan plus, per storage, the live bytes (a uint8 view, CPU or CUDA) still to be copied."""

    plan: CheckpointPlan
    sources: list[torch.Tensor]

    @property
    def devices(self) -> set[torch.device]:
        return {s.device for s in self.sources}


def bytes_of(storage: torch.UntypedStorage, start: int, nbytes: int) -> torch.Tensor:
    """A uint8 view of `nbytes` of `storage` from `start` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, start, (nbytes,), (1,))


def planned(structure: bytes, sources: list[torch.Tensor], file_format: str) -> CapturedState:
    """The plan of a file whose storages are `sources` (uint8 views), each at a page in the slab."""
    storages: list[StorageMeta] = []
    slab_offset = 0
    for source in sources:
        storages.append(StorageMeta(slab_offset=slab_offset, nbytes=source.numel()))
        slab_offset += round_up(source.numel())
    plan = CheckpointPlan(structure, storages, max(slab_offset, PAGE_SIZE), file_format)
    return CapturedState(plan=plan, sources=sources)
