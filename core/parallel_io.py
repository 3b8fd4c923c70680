"""The write engine: chunks of staged bytes written in parallel at their file offsets.

Positioned writes of 1 MiB and more go through an O_DIRECT descriptor where the filesystem, the
offset and the buffer's alignment allow (page-aligned staging slabs make that the common case),
and through the page cache otherwise; saves of less than 64 MiB are written by the calling
thread. A chunk whose digest equals the same chunk of the previous file of its lineage is copied
from that file inside the kernel instead (incremental saves).
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from .fsutil import PAGE_SIZE, buffer_of, write_all
from .manifest import digest

logger = logging.getLogger(__name__)

# Below these sizes the page cache and the calling thread are cheaper: an O_DIRECT write waits
# for the device, write by write, and handing small chunks to threads costs more CPU than it saves
# (a 1 MB save of 32 tensors: the writer's CPU 5.9 -> 3.2-4.0 ms per save; the 40 MB save of the
# example's model and AdamW state, 51 tensors: 27 -> 22-24 ms, as fast to durable).
DIRECT_MIN_BYTES = 1 << 20
PARALLEL_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class PreviousRecord:
    """A storage record of the previous checkpoint file: an open descriptor, where the record
    starts, and its chunk digests; chunks with the same digest are copied from there."""

    fd: int
    offset: int
    digests: list[str]


@dataclass
class Chunk:
    """One piece of one storage and where it goes in the file."""

    key: str
    index: int
    file_offset: int
    data: torch.Tensor  # uint8 bytes to write
    start: int = 0  # where the chunk begins within its storage
    digest: str | None = None  # known already (computed while staging)
    previous: PreviousRecord | None = None  # the same record in the previous file of this lineage


@dataclass(frozen=True)
class ChunkWritten:
    chunk: Chunk
    digest: str | None
    copied: bool  # copied from the previous file instead of written


def open_direct(path: str) -> int:
    """A write-only O_DIRECT descriptor of `path`, or -1 where the platform or filesystem has none."""
    if not hasattr(os, "O_DIRECT"):
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        logger.debug("O_DIRECT not available for %s (%s); using buffered writes", path, exc)
        return -1


class DirectIO:
    """Positioned writes through an O_DIRECT descriptor where alignment and filesystem allow."""

    def __init__(self, path: str, enabled: bool) -> None:
        self.buffered = os.open(path, os.O_RDWR)
        self.direct = open_direct(path) if enabled else -1

    def pwrite(self, data: torch.Tensor, offset: int) -> None:
        view = buffer_of(data)
        aligned = len(view) - len(view) % PAGE_SIZE
        direct = self.direct >= 0 and aligned >= DIRECT_MIN_BYTES
        if direct and offset % PAGE_SIZE == 0 and data.data_ptr() % PAGE_SIZE == 0:
            try:
                write_all(self.direct, view[:aligned], offset)
                view, offset = view[aligned:], offset + aligned
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                logger.debug("O_DIRECT write refused (%s); using buffered writes", exc)
                os.close(self.direct)
                self.direct = -1
        write_all(self.buffered, view, offset)

    def close(self) -> None:
        for fd in (self.direct, self.buffered):
            if fd >= 0:
                os.close(fd)
        self.direct = self.buffered = -1


def write_chunks(out: DirectIO, chunks: list[Chunk], executor: Executor | None, checksums: bool) -> list[ChunkWritten]:
    """Write every chunk at its offset, in parallel, hashing it while its bytes are hot."""

    def write_chunk(chunk: Chunk) -> ChunkWritten:
        value = chunk.digest
        if value is None and (checksums or chunk.previous is not None):
            value = digest(buffer_of(chunk.data))
        previous = chunk.previous
        if previous is not None and previous.digests[chunk.index] == value:
            copy_range(previous.fd, previous.offset + chunk.start, out.buffered, chunk.file_offset, chunk.data.numel())
            return ChunkWritten(chunk, value, copied=True)
        out.pwrite(chunk.data, chunk.file_offset)
        return ChunkWritten(chunk, value, copied=False)

    by_size = sorted(chunks, key=lambda c: -c.data.numel())
    total = sum(c.data.numel() for c in chunks)
    if executor is None or total < PARALLEL_MIN_BYTES:
        return [write_chunk(chunk) for chunk in by_size]

    def write_group(group: list[Chunk]) -> list[ChunkWritten]:
        return [write_chunk(chunk) for chunk in group]

    groups = _balanced_groups(by_size, min(len(by_size), MAX_GROUPS, max(1, total // GROUP_MIN_BYTES)))
    return [written for group in executor.map(write_group, groups) for written in group]


# A task per chunk costs the writer's CPU for every small tensor (hundreds per save): the chunks
# go to the threads in this many groups of about equal bytes at most, of this many bytes at least.
MAX_GROUPS = 16
GROUP_MIN_BYTES = 4 << 20


def _balanced_groups(by_size: list[Chunk], count: int) -> list[list[Chunk]]:
    """`by_size` (largest first) in `count` groups of about equal bytes, each largest first, the
    groups with the most bytes first (so that one big tensor does not start last and finish alone)."""
    groups: list[tuple[int, int, list[Chunk]]] = [(0, index, []) for index in range(count)]
    for chunk in by_size:
        nbytes, index, group = heapq.heappop(groups)
        group.append(chunk)
        heapq.heappush(groups, (nbytes + chunk.data.numel(), index, group))
    return [group for _, _, group in sorted(groups, key=lambda g: -g[0]) if group]


def copy_range(source_fd: int, source_offset: int, dest_fd: int, dest_offset: int, nbytes: int) -> None:
    """Copy bytes between files inside the kernel (a shared-extent clone on XFS, btrfs and the like)."""
    while nbytes:
        copied = os.copy_file_range(source_fd, dest_fd, nbytes, source_offset, dest_offset)
        if copied == 0:
            raise OSError(errno.EIO, "the previous checkpoint file ended early while copying from it")
        source_offset, dest_offset, nbytes = source_offset + copied, dest_offset + copied, nbytes - copied
