"""Writing checkpoint files: torch.save's zip layout (or safetensors) without torch.save.

The zip skeleton (the pickle, small records, space reserved for every storage at 4096-byte
aligned offsets, and the manifest's placeholder) is written first; then the storage bytes go
straight from the staging memory to their offsets in parallel; then the filled manifest; then
one fsync. The archive's inner folder is named after the final file, as torch.save names it.

Zip CRCs: every record carries its real CRC-32 except the storage records `data/<n>`, which
carry 0, as torch.save writes them with `compute_crc32=False`; `torch.load` does not check
them, and the manifest's xxh3 checksums of every chunk take their place.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import torch_internals
from .fsutil import DEFAULT_CHUNK_BYTES, PAGE_SIZE, write_all
from .manifest import MANIFEST_RECORD, Manifest, chunk_ranges
from .parallel_io import Chunk, DirectIO, PreviousRecord, write_chunks

STORAGE_ALIGNMENT = PAGE_SIZE


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
    manifest = Manifest(data_pkl, [b.numel() for b in storage_bytes], chunk_bytes, checksums, extra_metadata or {})
    offsets = _write_skeleton(path, data_pkl, [b.numel() for b in storage_bytes], manifest.placeholder)
    chunks = _chunks(storage_bytes, offsets, chunk_bytes, known_digests, previous or {})
    clock.mark("skeleton")
    out = DirectIO(path, use_direct_io)
    try:
        reused = 0
        for written in write_chunks(out, chunks, executor, checksums):
            manifest.set_digest(written.chunk.key, written.chunk.index, written.digest)
            reused += written.chunk.data.numel() if written.copied else 0
        clock.mark("data")
        _write_manifest(out.buffered, path, offsets[MANIFEST_RECORD], manifest)
        clock.mark("manifest")
        os.fsync(out.buffered)
        clock.mark("fsync")
    finally:
        out.close()
    return WrittenFile(sum(b.numel() for b in storage_bytes), reused, clock.seconds)


class StepClock:
    """Seconds spent in each named step, measured back to back."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def _archive_name(path: str) -> str:
    """The folder torch.save puts a file's records in: the file's name without its extension."""
    return os.path.splitext(os.path.basename(path))[0] or "archive"


def _write_skeleton(path: str, data_pkl: bytes, storage_sizes: Sequence[int], manifest: bytes) -> dict[str, int]:
    """Every record but the storages' bytes; returns each record's data offset ("0", "1", ..., manifest).

    torch's own zip writer lays the skeleton out (the archive folder named after the file, as
    torch.save names it), but into an anonymous memory file reached through a symlink of the
    same name: the space reserved for storages stays a hole there. The written extents are then
    pwritten into `path`. A C++ stream that fails on a full disk aborts the process; here every
    write to disk is Python's, and a full disk is an OSError like any other.
    """
    memory = os.memfd_create("async-ckpt-skeleton", os.MFD_CLOEXEC)
    try:
        _lay_out_skeleton(memory, path, data_pkl, storage_sizes, manifest)
        with os.fdopen(os.dup(memory), "rb") as skeleton:
            reader = torch_internals.FileReader(skeleton)
            offsets = {
                str(key): torch_internals.record_offset(reader, f"data/{key}") for key in range(len(storage_sizes))
            }
            offsets[MANIFEST_RECORD] = torch_internals.record_offset(reader, MANIFEST_RECORD)
            del reader
        _copy_extents(memory, path)
    finally:
        os.close(memory)
    return offsets


def _lay_out_skeleton(memory: int, path: str, data_pkl: bytes, storage_sizes: Sequence[int], manifest: bytes) -> None:
    alias_folder = os.path.join(os.path.dirname(path), ".skeleton")
    alias = os.path.join(alias_folder, os.path.basename(path))
    os.mkdir(alias_folder, 0o700)
    try:
        os.symlink(f"/proc/{os.getpid()}/fd/{memory}", alias)
        writer = torch_internals.FileWriter(alias, True, STORAGE_ALIGNMENT)
        writer.write_record("data.pkl", data_pkl, len(data_pkl))
        for name, value in (
            (".format_version", "1"),
            (".storage_alignment", str(STORAGE_ALIGNMENT)),
            ("byteorder", sys.byteorder),
        ):
            writer.write_record(name, value, len(value))  # str records, as torch.save writes
        for key, nbytes in enumerate(storage_sizes):
            torch_internals.reserve_record(writer, f"data/{key}", nbytes)
        writer.write_record(MANIFEST_RECORD, manifest, len(manifest))
        writer.write_end_of_file()
        del writer
    finally:
        shutil.rmtree(alias_folder, ignore_errors=True)


def _copy_extents(source: int, path: str) -> None:
    """Copy the written extents of `source` into `path` at the same offsets, leaving its holes."""
    size = os.fstat(source).st_size
    target = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(target, size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(source, offset, os.SEEK_DATA)
            except OSError as exc:  # ENXIO: no data after `offset`
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(source, start, os.SEEK_HOLE)
            write_all(target, os.pread(source, end - start, start), start)
            offset = end
    finally:
        os.close(target)


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


def _write_manifest(fd: int, path: str, offset: int, manifest: Manifest) -> None:
    """Put the filled manifest over its placeholder and give its record the matching CRC-32."""
    final = manifest.final()
    write_all(fd, final, offset)
    _patch_crc(fd, path, MANIFEST_RECORD, zlib.crc32(manifest.placeholder), zlib.crc32(final))


_LOCAL_HEADER = b"PK\x03\x04"
_DATA_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL_ENTRY = b"PK\x01\x02"


def _patch_crc(fd: int, path: str, record: str, old: int, new: int) -> None:
    """Replace a record's CRC-32 in its local header, data descriptor and central directory entry."""
    name = f"{_archive_name(path)}/{record}"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        central_start = archive.start_dir
    old_bytes, new_bytes = struct.pack("<I", old), struct.pack("<I", new)
    header = os.pread(fd, 30, info.header_offset)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    places = [info.header_offset + 14]
    descriptor = info.header_offset + 30 + name_length + extra_length + info.compress_size
    places += [descriptor + 4] if os.pread(fd, 4, descriptor) == _DATA_DESCRIPTOR else [descriptor]
    entry = central_start
    while os.pread(fd, 4, entry) == _CENTRAL_ENTRY:
        fixed = os.pread(fd, 46, entry)
        lengths = struct.unpack("<HHH", fixed[28:34])
        if os.pread(fd, lengths[0], entry + 46).decode() == name:
            places.append(entry + 16)
            break
        entry += 46 + sum(lengths)
    for place in places:
        if os.pread(fd, 4, place) == old_bytes:
            write_all(fd, new_bytes, place)


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
