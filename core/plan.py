"""The plan of one checkpoint: what crosses from the trainer to the writer besides the bytes.

A plan is a file's structure (torch.save's pickle, or a safetensors header) and the place and
size of each storage's bytes. It is a few KiB and is all that crosses the pipe; the bytes go
through shared memory. `capture.py` and `safetensors_format.py` make plans, `rebuild.py` turns
a plan and its bytes back into a state dict, `plan_cache.py` reuses plans across saves.
"""

from __future__ import annotations

import array
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

    def __reduce__(self) -> tuple[Any, ...]:
        # The storage table crosses to the writer as one array, not thousands of pickled objects
        # (a large model's plan: ~2 ms of the hand-over, paid while the caller waits).
        table = array.array("q", [n for s in self.storages for n in (s.slab_offset, s.nbytes)])
        return _plan_from_wire, (self.structure, table.tobytes(), self.slab_nbytes, self.format, self.lineage)

    @property
    def slab_shape(self) -> tuple[Any, ...]:
        """What makes two plans' slabs interchangeable: format and every storage's place and size."""
        return (self.format, self.slab_nbytes, tuple((s.slab_offset, s.nbytes) for s in self.storages))


def _plan_from_wire(
    structure: bytes, table: bytes, slab_nbytes: int, file_format: str, lineage: Lineage | None
) -> CheckpointPlan:
    numbers = array.array("q")
    numbers.frombytes(table)
    storages = [StorageMeta(numbers[i], numbers[i + 1]) for i in range(0, len(numbers), 2)]
    return CheckpointPlan(structure, storages, slab_nbytes, file_format, lineage)


class CapturedState:
    """A plan plus, per storage, the live bytes (CPU or CUDA) still to be copied.

    `sources[i]` is a uint8 view of storage i's bytes. A capture that met the storages whole
    gives them instead, and `exact[i]`: a tensor whose own elements are exactly storage i's
    bytes (contiguous, from its start to its end, no conjugate or negative bit), or None. The
    copy takes such a tensor as it is; byte views are then made only where something asks for
    `sources` (thousands of storages: a few microseconds each, on the training thread).
    `memo` holds what the stager derives from the plan alone, for the next save of that plan.
    """

    def __init__(
        self,
        plan: CheckpointPlan,
        sources: list[torch.Tensor] | None = None,
        *,
        storages: list[torch.UntypedStorage] | None = None,
        exact: list[torch.Tensor | None] | None = None,
        memo: dict[Any, Any] | None = None,
    ) -> None:
        if (sources is None) == (storages is None):
            raise ValueError("give a captured state its sources or its storages, one of them")
        self.plan = plan
        self._sources = sources
        self._storages = storages
        self.exact: list[torch.Tensor | None] = exact if exact is not None else [None] * len(plan.storages)
        # What the stager derives from the plan alone, shared by the captures of one PlanCache entry.
        self.memo: dict[Any, Any] = {} if memo is None else memo

    @property
    def sources(self) -> list[torch.Tensor]:
        if self._sources is None:
            assert self._storages is not None
            self._sources = [bytes_of(storage, 0, storage.nbytes()) for storage in self._storages]
        return self._sources

    def source(self, index: int) -> torch.Tensor:
        """A uint8 view of storage `index`'s bytes (without making the others')."""
        if self._sources is not None:
            return self._sources[index]
        assert self._storages is not None
        storage = self._storages[index]
        return bytes_of(storage, 0, storage.nbytes())

    @property
    def devices(self) -> set[torch.device]:
        return {s.device for s in (self._sources if self._sources is not None else self._storages or [])}


def exact_tensor(tensor: torch.Tensor, storage: torch.UntypedStorage) -> torch.Tensor | None:
    """`tensor` when its elements are exactly `storage`'s bytes, as CapturedState.exact holds; else None."""
    if (
        tensor.storage_offset() == 0
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.numel() * tensor.element_size() == storage.nbytes()
        and tensor.is_contiguous()
    ):
        return tensor
    return None


def bytes_of(storage: torch.UntypedStorage, start: int, nbytes: int) -> torch.Tensor:
    """A uint8 view of `nbytes` of `storage` from `start` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, start, (nbytes,), (1,))


def plan_of_sizes(structure: bytes, sizes: list[int], file_format: str) -> CheckpointPlan:
    """The plan of a file whose storages hold `sizes` bytes, each at a page in the slab."""
    storages: list[StorageMeta] = []
    slab_offset = 0
    for nbytes in sizes:
        storages.append(StorageMeta(slab_offset=slab_offset, nbytes=nbytes))
        slab_offset += round_up(nbytes)
    return CheckpointPlan(structure, storages, max(slab_offset, PAGE_SIZE), file_format)


def planned(structure: bytes, sources: list[torch.Tensor], file_format: str) -> CapturedState:
    """The captured state of a file whose storages are `sources` (uint8 views)."""
    return CapturedState(plan_of_sizes(structure, [s.numel() for s in sources], file_format), sources)
