"""The on-disk format: a file `torch.load(path, weights_only=True)` reads, plus a manifest.

The file is PyTorch's own zip layout, produced without `torch.save` touching tensor bytes:
the pickle and the zip records are written with space reserved for every storage (aligned to
4096 bytes), then the storage bytes are written in parallel with positioned writes straight
from the staging buffer (O_DIRECT where the filesystem takes it). One extra record,
`async_ckpt_manifest.json`, which `torch.load` ignores, holds the format version, the size
and xxh3-64 checksums (per chunk) of every storage and of the pickle, so that a reader can
verify the file and name exactly what is damaged.

The zip's own CRC fields of storage records are left zero, as with
`torch.utils.serialization.config.save.compute_crc32 = False`; `torch.load` does not check
them, and the manifest's checksums take their place.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import zipfile
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import xxhash

from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointError,
    UnsupportedFormatVersionError,
)
from .plan import PAGE_SIZE, buffer_of

logger = logging.getLogger(__name__)

FORMAT_NAME = "async-ckpt"
FORMAT_VERSION = 1
MANIFEST_RECORD = "async_ckpt_manifest.json"
STORAGE_ALIGNMENT = PAGE_SIZE
DEFAULT_CHUNK_BYTES = 64 << 20
_DIGEST_PLACEHOLDER = "0" * 16
_ZIP_MAGIC = b"PK\x03\x04"


def _digest(data: memoryview | bytes) -> str:
    return format(xxhash.xxh3_64_intdigest(data), "016x")


def _chunks(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    return [(start, min(chunk_bytes, nbytes - start)) for start in range(0, nbytes, chunk_bytes)]


def chunk_digests(tensors: Sequence[torch.Tensor], chunk_bytes: int, executor: Executor | None = None) -> list[list[str]]:
    """The manifest's digests of CPU uint8 tensors, one list per tensor with one digest per
    chunk; every chunk of every tensor hashed in parallel on `executor` (xxh3 releases the GIL)."""
    parts, owners = [], []
    for index, data in enumerate(tensors):
        view = buffer_of(data)
        for start, size in _chunks(len(view), chunk_bytes):
            parts.append(view[start : start + size])
            owners.append(index)
    digests: list[list[str]] = [[] for _ in tensors]
    for owner, digest in zip(owners, executor.map(_digest, parts) if executor else map(_digest, parts)):
        digests[owner].append(digest)
    return digests


@dataclass
class _Chunk:
    key: str
    index: int
    file_offset: int
    data: torch.Tensor  # uint8 bytes to write
    start: int = 0  # where the chunk begins within its storage
    digest: str | None = None  # known already (computed while staging)
    previous: "PreviousRecord | None" = None  # the same record in the previous file of this lineage


@dataclass(frozen=True)
class PreviousRecord:
    """A storage record of the previous checkpoint file: an open descriptor, where the record
    starts, and its chunk digests; chunks with the same digest are copied from there."""

    fd: int
    offset: int
    digests: list[str]


class _DirectIO:
    """Positioned writes through an O_DIRECT descriptor where alignment and filesystem allow."""

    def __init__(self, path: str, enabled: bool) -> None:
        self.buffered = os.open(path, os.O_RDWR)
        self.direct = -1
        if enabled and hasattr(os, "O_DIRECT"):
            try:
                self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError as exc:
                logger.debug("O_DIRECT not available for %s (%s); using buffered writes", path, exc)

    def pwrite(self, data: torch.Tensor, offset: int) -> None:
        view = buffer_of(data)
        aligned = len(view) - len(view) % PAGE_SIZE
        if self.direct >= 0 and aligned and offset % PAGE_SIZE == 0 and data.data_ptr() % PAGE_SIZE == 0:
            try:
                _write_all(self.direct, view[:aligned], offset)
                view, offset = view[aligned:], offset + aligned
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                logger.debug("O_DIRECT write refused (%s); using buffered writes", exc)
                os.close(self.direct)
                self.direct = -1
        _write_all(self.buffered, view, offset)

    def close(self) -> None:
        for fd in (self.direct, self.buffered):
            if fd >= 0:
                os.close(fd)
        self.direct = self.buffered = -1


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_chunks(
    out: _DirectIO, chunks: list[_Chunk], executor: Executor | None, checksums: bool
) -> list[tuple[_Chunk, str | None, bool]]:
    """Write every chunk at its offset, in parallel. Returns each chunk with its digest (None
    without checksums) and whether it was copied from the previous file instead of written."""

    def write_chunk(chunk: _Chunk) -> tuple[str | None, bool]:
        digest = chunk.digest
        if digest is None and (checksums or chunk.previous is not None):
            digest = _digest(buffer_of(chunk.data))
        previous = chunk.previous
        if previous is not None and previous.digests[chunk.index] == digest:
            _copy_range(previous.fd, previous.offset + chunk.start, out.buffered, chunk.file_offset, chunk.data.numel())
            return digest, True
        out.pwrite(chunk.data, chunk.file_offset)
        return digest, False

    # Largest first, so that one big tensor does not start last and finish alone.
    by_size = sorted(chunks, key=lambda c: -c.data.numel())
    results = executor.map(write_chunk, by_size) if executor else map(write_chunk, by_size)
    return [(chunk, digest, reused) for chunk, (digest, reused) in zip(by_size, results)]


def _copy_range(source_fd: int, source_offset: int, dest_fd: int, dest_offset: int, nbytes: int) -> None:
    """Copy bytes between files inside the kernel (a shared-extent clone on XFS, btrfs and the like)."""
    while nbytes:
        copied = os.copy_file_range(source_fd, dest_fd, nbytes, source_offset, dest_offset)
        if copied == 0:
            raise OSError(errno.EIO, "the previous checkpoint file ended early while copying from it")
        source_offset, dest_offset, nbytes = source_offset + copied, dest_offset + copied, nbytes - copied


@dataclass(frozen=True)
class WrittenFile:
    """What writing one checkpoint file did: tensor bytes in it, and how many were copied from
    the previous file of its lineage instead of written."""

    nbytes: int
    reused_nbytes: int = 0


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
    """Write a checkpoint file at `path`, fsynced.

    `data_pkl` is torch.save's pickle (see plan.capture); `storage_bytes[i]` holds the bytes
    of its storage "i" as a CPU uint8 tensor. `known_digests[i]`: that storage's chunk digests
    when already computed. `previous`: records of the previous checkpoint of this lineage, by
    key; chunks whose digest matches are copied from that file instead of written.
    """
    ordered = [(index, str(index)) for index in range(len(storage_bytes))]
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "checksum": "xxh3_64" if checksums else None,
        "chunk_bytes": chunk_bytes,
        "data.pkl": {"nbytes": len(data_pkl), "digest": _digest(data_pkl)},
        "storages": {
            key: {
                "nbytes": storage_bytes[index].numel(),
                "digests": [_DIGEST_PLACEHOLDER] * len(_chunks(storage_bytes[index].numel(), chunk_bytes))
                if checksums
                else [],
            }
            for index, key in ordered
        },
        **(extra_metadata or {}),
    }
    placeholder = json.dumps(manifest).encode()

    writer = torch._C.PyTorchFileWriter(path, False, STORAGE_ALIGNMENT)
    writer.write_record("data.pkl", data_pkl, len(data_pkl))
    for name, value in ((".format_version", "1"), (".storage_alignment", str(STORAGE_ALIGNMENT))):
        writer.write_record(name, value, len(value))
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for index, key in ordered:
        writer.write_record_metadata(f"data/{key}", storage_bytes[index].numel())
    writer.write_record(MANIFEST_RECORD, placeholder, len(placeholder))
    writer.write_end_of_file()
    del writer

    reader = torch._C.PyTorchFileReader(path)
    previous = previous or {}
    chunks = [
        _Chunk(
            key, n, reader.get_record_offset(f"data/{key}") + start, storage_bytes[index][start : start + size], start,
            known_digests[index][n] if known_digests and known_digests[index] else None, previous.get(key),
        )
        for index, key in ordered
        for n, (start, size) in enumerate(_chunks(storage_bytes[index].numel(), chunk_bytes))
    ]
    manifest_offset = reader.get_record_offset(MANIFEST_RECORD)
    del reader

    out = _DirectIO(path, use_direct_io)
    reused = 0
    try:
        for chunk, digest, copied in _write_chunks(out, chunks, executor, checksums):
            reused += chunk.data.numel() if copied else 0
            if checksums:
                manifest["storages"][chunk.key]["digests"][chunk.index] = digest
        final = json.dumps(manifest).encode()
        assert len(final) == len(placeholder), "manifest changed length while filling digests"
        os.pwrite(out.buffered, final, manifest_offset)
        os.fsync(out.buffered)
    finally:
        out.close()
    return WrittenFile(sum(b.numel() for b in storage_bytes), reused)


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
        for start, size in _chunks(data.numel(), chunk_bytes):
            chunks.append(_Chunk("", 0, offset + start, data[start : start + size]))
        offset += data.numel()
    out = _DirectIO(path, use_direct_io)
    try:
        _write_chunks(out, chunks, executor, checksums=False)
        os.fsync(out.buffered)
    finally:
        out.close()
    return WrittenFile(offset - len(header))


_FICLONE = 0x40049409  # _IOW(0x94, 9, int): clone a whole file's extents (Linux)
_clones_on_device: dict[int, bool] = {}


def filesystem_clones(directory: str) -> bool:
    """Whether files in `directory` can share extents (XFS, btrfs, ...): probed once per filesystem
    by cloning a one-page file. Copies between files there cost no data writes."""
    device = os.stat(directory).st_dev
    if device not in _clones_on_device:
        import fcntl
        import tempfile

        with tempfile.TemporaryFile(dir=directory) as source, tempfile.TemporaryFile(dir=directory) as dest:
            source.write(b"\0" * PAGE_SIZE)
            source.flush()
            try:
                fcntl.ioctl(dest.fileno(), _FICLONE, source.fileno())
                _clones_on_device[device] = True
            except OSError:
                _clones_on_device[device] = False
    return _clones_on_device[device]


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointFile:
    """An open checkpoint file: validated on open, verified record by record as it is read."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.exists(path):
            raise CheckpointNotFoundError(f"no checkpoint at {path!r}: the file does not exist")
        if os.path.isdir(path):
            raise NotACheckpointError(f"{path!r} is a directory, not a checkpoint file")
        with open(path, "rb") as f:
            head = f.read(4)
        if head != _ZIP_MAGIC:
            raise NotACheckpointError(
                f"{path!r} is not a PyTorch checkpoint: it does not start with the zip signature "
                "torch.save writes (is it a legacy or non-PyTorch file?)"
            )
        try:
            self._zip = torch._C.PyTorchFileReader(path)
        except RuntimeError as exc:
            if zipfile.is_zipfile(path):
                raise NotACheckpointError(
                    f"{path!r} is a zip file but not a PyTorch checkpoint ({exc})"
                ) from None
            raise CorruptCheckpointError(
                f"checkpoint {path!r} is truncated or damaged: its zip directory cannot be read ({exc}). "
                "Use an earlier checkpoint"
            ) from None
        self.records = set(self._zip.get_all_records())
        if "data.pkl" not in self.records:
            raise NotACheckpointError(f"{path!r} is a zip file but not a PyTorch checkpoint (no data.pkl)")
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any] | None:
        if MANIFEST_RECORD not in self.records:
            return None
        try:
            manifest = json.loads(bytes(self._zip.get_record(MANIFEST_RECORD)))
        except (RuntimeError, ValueError) as exc:
            raise CorruptCheckpointError(f"checkpoint {self.path!r}: its manifest is unreadable ({exc})") from None
        if manifest.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"checkpoint {self.path!r}: its manifest names format {manifest.get('format')!r}")
        if int(manifest.get("version", 0)) > FORMAT_VERSION:
            raise UnsupportedFormatVersionError(
                f"checkpoint {self.path!r} has format version {manifest['version']}, newer than the "
                f"{FORMAT_VERSION} this async-ckpt reads; upgrade async-ckpt to load it"
            )
        return manifest

    @property
    def verifiable(self) -> bool:
        """Whether the file carries checksums this reader can check."""
        return self.manifest is not None and self.manifest.get("checksum") == "xxh3_64"

    def data_pkl(self, verify: bool = True) -> bytes:
        data = bytes(self._zip.get_record("data.pkl"))
        if verify and self.verifiable:
            expected = self.manifest["data.pkl"]
            if len(data) != expected["nbytes"] or _digest(data) != expected["digest"]:
                raise CorruptCheckpointError(
                    f"checkpoint {self.path!r} is damaged: record data.pkl (the object structure) "
                    "fails its checksum"
                )
        return data

    def storage_offset(self, key: str) -> int:
        return self._zip.get_record_offset(f"data/{key}")

    def read_storage(self, fd: int, key: str, dest: torch.Tensor, verify: bool = True) -> bool:
        """Fill `dest` (CPU uint8) with storage `key`; False when verified bytes fail their checksum."""
        offset = self.storage_offset(key)
        view = buffer_of(dest)
        chunk_bytes = self.manifest["chunk_bytes"] if self.manifest else DEFAULT_CHUNK_BYTES
        digests = self.manifest["storages"][key]["digests"] if (verify and self.verifiable) else None
        for n, (start, size) in enumerate(_chunks(len(view), chunk_bytes)):
            part = view[start : start + size]
            got = os.preadv(fd, [part], offset + start)
            if got != size:
                raise CorruptCheckpointError(
                    f"checkpoint {self.path!r} is truncated: storage data/{key} ends after {start + got} bytes"
                )
            if digests is not None and _digest(part) != digests[n]:
                return False
        return True

    def damaged_records(self) -> list[str]:
        """Every record whose bytes fail their checksum (or are cut short), reading the whole file once.

        Files without checksums only have their structure checked.
        """
        damaged = []
        try:
            self.data_pkl(verify=True)
        except CorruptCheckpointError:
            damaged.append("data.pkl")
        if not self.verifiable:
            return damaged
        chunk_bytes = self.manifest["chunk_bytes"]
        buffer = bytearray(min(chunk_bytes, max((s["nbytes"] for s in self.manifest["storages"].values()), default=0)))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for key, storage in self.manifest["storages"].items():
                offset = self.storage_offset(key)
                for n, (start, size) in enumerate(_chunks(storage["nbytes"], chunk_bytes)):
                    part = memoryview(buffer)[:size]
                    if os.preadv(fd, [part], offset + start) != size or _digest(part) != storage["digests"][n]:
                        damaged.append(f"data/{key}")
                        break
        finally:
            os.close(fd)
        return damaged
