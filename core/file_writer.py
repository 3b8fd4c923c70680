"""Writing checkpoint files: torch.save's zip layout (or safetensors) without torch.save.

The zip skeleton (zip_skeleton.py: the pickle, small records, space reserved for every storage
at 4096-byte aligned offsets) is written first; then the storage bytes go straight from the
staging memory to their offsets in parallel; then the filled manifest with the rest of the zip;
then one fsync. The archive's inner folder is named after the final file, as torch.save names it.

Zip CRCs: every record carries its real CRC-32 except the storage records `data/<n>`, which
carry 0, as torch.save writes them with `compute_crc32=False`; `torch.load` does not check
them, and the manifest's xxh3 checksums of every chunk take their place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from .aligned_write import write_whole_file
from .fsutil import DEFAULT_CHUNK_BYTES, buffer_of
from .manifest import Manifest, chunk_digests, chunk_ranges
from .parallel_io import PARALLEL_MIN_BYTES, Chunk, DirectIO, PreviousRecord, write_chunks
from .zip_skeleton import skeleton_for


@dataclass(frozen=True)
class WrittenFile:
    """What writing one checkpoint file did: tensor bytes in it, how many were copied from the
    previous file of its lineage instead of written, and the seconds each step took."""

    nbytes: int
    reused_nbytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)


def write_checkpoint_file(
    path: str,
    data_pkl: bytes,
    storage_bytes: Sequence[torch.Tensor],
    *,
    executor: Executor | None,
    use_direct_io: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    checksums: bool = True,
    extra_metadata: dict[str, Any] | None = None,
    known_digests: Sequence[list[str] | None] | None = None,
    previous: dict[str, PreviousRecord] | None = None,
) -> WrittenFile:
    """Write a checkpoint file at `path` (which exists, empty) and fsync it.

    `data_pkl` is torch.save's pickle (see capture.py); `storage_bytes[i]` holds the bytes
    of its storage "i" as a CPU uint8 tensor. `known_digests[i]`: that storage's chunk digests
    when already computed. `previous`: records of the previous checkpoint of this lineage, by
    key; chunks whose digest matches are copied from that file instead of written.
    """
    clock = StepClock()
    sizes = [b.numel() for b in storage_bytes]
    manifest = Manifest(data_pkl, sizes, chunk_bytes, checksums, extra_metadata or {})
    if sum(sizes) < PARALLEL_MIN_BYTES and not previous:
        _write_at_once(path, data_pkl, manifest, storage_bytes, known_digests, use_direct_io, clock)
        return WrittenFile(sum(sizes), 0, clock.seconds)
    skeleton = skeleton_for(path, data_pkl, sizes, manifest.placeholder)
    clock.mark("skeleton")
    chunks = _chunks(storage_bytes, skeleton.offsets, chunk_bytes, known_digests, previous or {})
    out = DirectIO(path, use_direct_io)
    try:
        skeleton.write(out.buffered)
        reused = 0
        for written in write_chunks(out, chunks, executor, checksums):
            manifest.set_digest(written.chunk.key, written.chunk.index, written.digest)
            reused += written.chunk.data.numel() if written.copied else 0
        clock.mark("data")
        skeleton.finish(out.buffered, manifest.final())
        clock.mark("manifest")
        os.fsync(out.buffered)
        clock.mark("fsync")
    finally:
        out.close()
    return WrittenFile(sum(sizes), reused, clock.seconds)


def _write_at_once(
    path: str,
    data_pkl: bytes,
    manifest: Manifest,
    storage_bytes: Sequence[torch.Tensor],
    known_digests: Sequence[list[str] | None] | None,
    use_direct_io: bool,
    clock: StepClock,
) -> None:
    """A small file: its digests first, then every byte of it in one gathered write (through
    O_DIRECT where it can), then fsync. (Positioned writes piece by piece cost the writer more CPU
    than the bytes themselves.)"""
    views = [buffer_of(b) for b in storage_bytes]
    if manifest.checksums:
        known: list[list[str] | None] = list(known_digests or [None] * len(views))
        missing = [i for i, values in enumerate(known) if values is None]
        for index, computed in zip(missing, chunk_digests([views[i] for i in missing], manifest.chunk_bytes)):
            known[index] = computed
        for key, values in enumerate(known):
            for chunk, value in enumerate(values or ()):
                manifest.set_digest(str(key), chunk, value)
    filled = manifest.final()  # laid out as it is: the digests are known
    skeleton = skeleton_for(path, data_pkl, [len(view) for view in views], filled)
    clock.mark("skeleton")
    fd = os.open(path, os.O_WRONLY)
    try:
        write_whole_file(fd, path, skeleton.whole(views, filled), use_direct_io)
        clock.mark("data")
        os.fsync(fd)
        clock.mark("fsync")
    finally:
        os.close(fd)


class StepClock:
    """Seconds spent in each named step, measured back to back."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def _chunks(
    storage_bytes: Sequence[torch.Tensor],
    offsets: dict[str, int],
    chunk_bytes: int,
    known_digests: Sequence[list[str] | None] | None,
    previous: dict[str, PreviousRecord],
) -> list[Chunk]:
    chunks = []
    for index, data in enumerate(storage_bytes):
        key = str(index)
        known = known_digests[index] if known_digests else None
        for n, (start, size) in enumerate(chunk_ranges(data.numel(), chunk_bytes)):
            chunks.append(
                Chunk(
                    key,
                    n,
                    offsets[key] + start,
                    data[start : start + size],
                    start,
                    known[n] if known else None,
                    previous.get(key),
                )
            )
    return chunks


def write_safetensors_file(
    path: str,
    header: bytes,
    storage_bytes: Sequence[torch.Tensor],
    *,
    executor: Executor | None,
    use_direct_io: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> WrittenFile:
    """Write a safetensors file: `header` (length prefix included), then the tensors back to back."""
    with open(path, "wb") as f:
        f.write(header)
    chunks = []
    offset = len(header)
    for data in storage_bytes:
        for start, size in chunk_ranges(data.numel(), chunk_bytes):
            chunks.append(Chunk("", 0, offset + start, data[start : start + size]))
        offset += data.numel()
    out = DirectIO(path, use_direct_io)
    try:
        write_chunks(out, chunks, executor, checksums=False)
        os.fsync(out.buffered)
    finally:
        out.close()
    return WrittenFile(offset - len(header))
