"""Sharded checkpoints in DCP's own format, with checksums of ours beside it.

A sharded checkpoint is a directory:

    __<rank>_<write id>.distcp   one per rank: a torch.save archive per item, as DCP writes them
    .metadata                    DCP's Metadata, pickled: stock torch.distributed.checkpoint.load
                                 (and Lightning's, Accelerate's, torchtitan's loaders) read it
    async_ckpt_index_<id>.json   every item's place in the files and its checksums: our loads
                                 verify every byte they read and need no pickle to find them
    commit.json                  written last, naming the rank files and the index (its digest)

Each rank writes only its own file; rank 0 writes the rest once every rank's file is durable.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import torch_internals
from .capture import tensor_pickle
from .commit import is_plain_name
from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .file_writer import WrittenFile
from .fsutil import PAGE_SIZE, fsync_directory, round_up, write_all
from .manifest import CHECKSUM, chunk_ranges, digest
from .parallel_io import Chunk, DirectIO, write_chunks
from .sharded_plan import ShardedItem, ShardedStructure

METADATA_FILE = ".metadata"
INDEX_FORMAT = "async-ckpt-sharded"
INDEX_VERSION = 1
ITEM_CHUNK_BYTES = 4 << 20  # checksum granularity: a load of part of an item reads whole such chunks
DCP_VERSION = "1.0.0"
_LARGE_ITEM = 1 << 20  # items at least this large get page-aligned data (O_DIRECT writes)
_SMALL_ALIGNMENT = 64  # torch.save's own alignment


def rank_file_name(rank: int, write_id: str) -> str:
    """The name of a rank's file for one save (a new name each save: an overwrite never mixes)."""
    return f"__{rank}_{write_id[:12]}.distcp"


INDEX_PREFIX = "async_ckpt_index_"


def index_file_name(write_id: str) -> str:
    return f"{INDEX_PREFIX}{write_id[:12]}.json"


@dataclass(frozen=True)
class PlacedItem:
    """Where one item lies in a rank's file: its archive (`offset`, `length`), and for tensor
    items where the chunk's bytes start (`data_offset`) and their checksums."""

    fqn: str
    file: str
    offset: int
    length: int
    nbytes: int
    digests: tuple[str, ...]
    dtype: str | None = None  # tensor items: e.g. "float32"
    size: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None
    sizes: tuple[int, ...] | None = None
    data_offset: int | None = None

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> PlacedItem:
        if not isinstance(raw, dict):
            raise ValueError(f"an item is {type(raw).__name__}, not an object")
        tuples = {k: tuple(raw[k]) if raw.get(k) is not None else None for k in ("size", "offsets", "sizes")}
        item = cls(**{**raw, **tuples, "digests": tuple(raw["digests"])})
        item.check()
        return item

    def check(self, chunk_bytes: int | None = None) -> None:
        """Raise ValueError unless the item is self-consistent: a plain file name, the chunk inside
        the tensor, its bytes inside its archive, one digest per checksum chunk (`chunk_bytes`)."""
        if not isinstance(self.fqn, str) or not isinstance(self.file, str) or not is_plain_name(self.file):
            raise ValueError(f"item {self.fqn!r} names file {self.file!r}")
        if not all(_natural(n) for n in (self.offset, self.length, self.nbytes)):
            raise ValueError(f"item {self.fqn!r} has a bad place in its file")
        if not all(isinstance(d, str) for d in self.digests):
            raise ValueError(f"item {self.fqn!r} has bad digests")
        if not self.is_tensor:
            return
        size, offsets, sizes = self.size or (), self.offsets or (), self.sizes or ()
        if self.size is None or not len(size) == len(offsets) == len(sizes):
            raise ValueError(f"item {self.fqn!r}: its shape, offsets and sizes disagree in length")
        if not all(_natural(n) for n in (*size, *offsets, *sizes)) or any(
            o + s > whole for o, s, whole in zip(offsets, sizes, size)
        ):
            raise ValueError(f"item {self.fqn!r}: its chunk lies outside its tensor")
        if self.nbytes != _numel(sizes) * _dtype(self.dtype).itemsize:
            raise ValueError(f"item {self.fqn!r}: {self.nbytes} bytes for a chunk of {sizes}")
        if self.data_offset is not None and not (
            _natural(self.data_offset) and self.offset <= self.data_offset <= self.offset + self.length - self.nbytes
        ):
            raise ValueError(f"item {self.fqn!r}: its data lies outside its archive")
        if chunk_bytes is not None and self.digests and len(self.digests) != -(-self.nbytes // chunk_bytes):
            raise ValueError(f"item {self.fqn!r}: {len(self.digests)} digests for {self.nbytes} bytes")


# -------------------------------------------------------------------------------- writing


class _Recorder:
    """The file object torch's zip writer writes one archive into: it keeps the written pieces and
    where the reserved record (a storage's bytes, written later) starts."""

    def __init__(self) -> None:
        self.position = 0
        self.pieces: list[tuple[int, bytes]] = []
        self.reserved_at: int | None = None

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.pieces.append((self.position, data))
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            self.reserved_at = self.position
            self.position += offset
        else:
            self.position = offset
        return self.position

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass


def _tensor_archive(item: ShardedItem, nbytes: int, alignment: int) -> tuple[list[tuple[int, bytes]], int, int]:
    """(pieces, data offset, length) of torch.save's archive of the item's chunk, its bytes left out."""
    assert item.dtype is not None and item.sizes is not None
    recorder = _Recorder()
    writer = torch_internals.FileWriter(recorder, True, alignment)
    data_pkl = tensor_pickle(item.dtype, item.sizes)
    writer.write_record("data.pkl", data_pkl, len(data_pkl))
    for name, value in ((".format_version", "1"), (".storage_alignment", str(alignment)), ("byteorder", sys.byteorder)):
        writer.write_record(name, value, len(value))  # str records, as torch.save writes
    before = recorder.position
    torch_internals.reserve_record(writer, "data/0", nbytes)
    data_start = recorder.reserved_at if recorder.reserved_at is not None else recorder.position
    writer.write_end_of_file()
    del writer
    assert data_start >= before
    return recorder.pieces, data_start, recorder.position


@dataclass(frozen=True)
class _Laid:
    """An item's place in the file being written: its archive and, for a tensor, its data."""

    item: ShardedItem
    offset: int
    length: int
    nbytes: int
    data_offset: int | None


def _lay_out(
    structure: ShardedStructure, storage_bytes: Sequence[torch.Tensor]
) -> tuple[list[_Laid], list[tuple[int, bytes]], list[Chunk], int]:
    """Where each item goes: (items placed, archive pieces to write, data chunks, file size)."""
    laid: list[_Laid] = []
    pieces: list[tuple[int, bytes]] = []
    chunks: list[Chunk] = []
    position = 0
    for index, item in enumerate(structure.items):
        if item.is_tensor:
            assert item.storage is not None
            data = storage_bytes[item.storage]
            nbytes = data.numel()
            alignment = PAGE_SIZE if nbytes >= _LARGE_ITEM else _SMALL_ALIGNMENT
            archive, data_start, length = _tensor_archive(item, nbytes, alignment)
            base = round_up(position, alignment)
            pieces += [(base + offset, piece) for offset, piece in archive]
            for n, (start, size) in enumerate(chunk_ranges(nbytes, ITEM_CHUNK_BYTES)):
                chunks.append(Chunk(str(index), n, base + data_start + start, data[start : start + size], start))
            laid.append(_Laid(item, base, length, nbytes, base + data_start))
        else:
            assert item.payload is not None
            base = round_up(position, _SMALL_ALIGNMENT)
            length = len(item.payload)
            pieces.append((base, item.payload))
            laid.append(_Laid(item, base, length, length, None))
        position = base + length
    return laid, pieces, chunks, position


def write_rank_file(
    path: str,
    name: str,
    structure: ShardedStructure,
    storage_bytes: Sequence[torch.Tensor],
    *,
    executor: Executor | None,
    use_direct_io: bool,
    checksums: bool,
) -> tuple[WrittenFile, list[PlacedItem]]:
    """Write a rank's file at `path` (which exists, empty): one archive per item, the chunks'
    bytes pwritten in parallel from `storage_bytes`, then one fsync. `name` is the file's final
    name, which the placed items record. The WrittenFile counts tensor bytes."""
    laid, pieces, chunks, size = _lay_out(structure, storage_bytes)
    digests: dict[str, list[tuple[int, str]]] = {}
    out = DirectIO(path, use_direct_io)
    try:
        os.ftruncate(out.buffered, size)
        for offset, piece in pieces:
            write_all(out.buffered, piece, offset)
        for written in write_chunks(out, chunks, executor, checksums):
            if written.digest is not None:
                digests.setdefault(written.chunk.key, []).append((written.chunk.index, written.digest))
        os.fsync(out.buffered)
    finally:
        out.close()
    placed = []
    for index, entry in enumerate(laid):
        item = entry.item
        if item.is_tensor:
            ordered = tuple(d for _, d in sorted(digests.get(str(index), [])))
            dtype = str(item.dtype).removeprefix("torch.")
            placed.append(
                PlacedItem(
                    item.fqn, name, entry.offset, entry.length, entry.nbytes, ordered,
                    dtype, item.size, item.offsets, item.sizes, entry.data_offset,
                )
            )  # fmt: skip
        else:
            assert item.payload is not None
            payload_digest = (digest(item.payload),) if checksums else ()
            placed.append(PlacedItem(item.fqn, name, entry.offset, entry.length, entry.nbytes, payload_digest))
    tensor_bytes = sum(entry.nbytes for entry in laid if entry.item.is_tensor)
    return WrittenFile(tensor_bytes), placed


def dcp_metadata(items: Sequence[PlacedItem], mapping: dict[str, Any], checkpoint_id: str, save_id: str) -> Any:
    """DCP's Metadata for the items of every rank's file, as FileSystemWriter.finish writes it."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for item in items:
        where = torch_internals.dcp_storage_info(item.file, item.offset, item.length)
        if item.is_tensor:
            assert item.size is not None and item.offsets is not None and item.sizes is not None
            tensor = state.setdefault(
                item.fqn, TensorStorageMetadata(TensorProperties(dtype=_dtype(item.dtype)), torch.Size(item.size), [])
            )
            storage[MetadataIndex(item.fqn, torch.Size(item.offsets), len(tensor.chunks))] = where
            tensor.chunks.append(ChunkStorageMetadata(torch.Size(item.offsets), torch.Size(item.sizes)))
        else:
            state[item.fqn] = BytesStorageMetadata()
            storage[MetadataIndex(item.fqn)] = where
    return Metadata(
        state,
        planner_data={fqn: tuple(path) for fqn, path in mapping.items()},
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id),
        version=DCP_VERSION,
    )


def index_content(items: Sequence[PlacedItem], mapping: dict[str, Any], checksums: bool) -> bytes:
    return json.dumps(
        {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "checksum": CHECKSUM if checksums else None,
            "chunk_bytes": ITEM_CHUNK_BYTES,
            "mapping": {fqn: list(path) for fqn, path in mapping.items()},
            "items": [item.to_json() for item in items],
        }
    ).encode()


def write_durably(directory: str, name: str, content: bytes) -> None:
    """`directory/name` replaced atomically by `content` (temporary file, fsync, rename)."""
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_directory(directory)


# -------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardedIndex:
    """What a loader needs of a sharded checkpoint: every item by name, and the flat names' paths."""

    items: dict[str, list[PlacedItem]]
    mapping: dict[str, tuple[Any, ...]]
    verifiable: bool
    chunk_bytes: int = ITEM_CHUNK_BYTES


def parse_index(raw: bytes, where: str) -> ShardedIndex:
    try:
        index = json.loads(raw)
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise ValueError("it is not an async-ckpt sharded index")
        if index.get("version") != INDEX_VERSION or index.get("checksum") not in (None, CHECKSUM):
            raise ValueError(f"version {index.get('version')!r} checksum {index.get('checksum')!r}")
        chunk_bytes = index["chunk_bytes"]
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes is {chunk_bytes!r}")
        items: dict[str, list[PlacedItem]] = {}
        for raw_item in index["items"]:
            item = PlacedItem.from_json(raw_item)
            item.check(chunk_bytes)
            if index["checksum"] is not None and not item.digests and (item.nbytes or not item.is_tensor):
                raise ValueError(f"item {item.fqn!r} has no checksums")
            items.setdefault(item.fqn, []).append(item)
        mapping = {str(fqn): tuple(path) for fqn, path in dict(index["mapping"]).items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, CorruptCheckpointError) as exc:
        raise CorruptCheckpointError(f"sharded index {where!r} is damaged ({type(exc).__name__}: {exc})") from None
    return ShardedIndex(items, mapping, index["checksum"] is not None, chunk_bytes)


_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("torch", "Size"),
    ("torch", "strided"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's .metadata building only DCP's metadata types (and dtypes), nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def read_dcp_metadata(directory: str) -> ShardedIndex:
    """The index of a checkpoint stock DCP wrote (no checksums: it has none), from its .metadata."""
    where = os.path.join(directory, METADATA_FILE)
    try:
        with open(where, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"DCP metadata {where!r} holds objects it should not: {exc}") from None
    except Exception as exc:
        raise CorruptCheckpointError(f"DCP metadata {where!r} cannot be read ({type(exc).__name__}: {exc})") from None
    items: dict[str, list[PlacedItem]] = {}
    try:
        for key, info in metadata.storage_data.items():
            described = metadata.state_dict_metadata[key.fqn]
            if key.offset is None:
                item = PlacedItem(key.fqn, info.relative_path, info.offset, info.length, info.length, ())
            else:
                chunk = next(c for c in described.chunks if tuple(c.offsets) == tuple(key.offset))
                dtype = str(described.properties.dtype).removeprefix("torch.")
                sizes = tuple(chunk.sizes)
                nbytes = _numel(sizes) * _dtype(dtype).itemsize
                item = PlacedItem(
                    key.fqn,
                    info.relative_path,
                    info.offset,
                    info.length,
                    nbytes,
                    (),
                    dtype,
                    tuple(described.size),
                    tuple(key.offset),
                    sizes,
                    None,
                )
            items.setdefault(key.fqn, []).append(item)
        mapping = {fqn: tuple(path) for fqn, path in (metadata.planner_data or {}).items()}
    except (AttributeError, KeyError, StopIteration, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"DCP metadata {where!r} is inconsistent ({exc})") from None
    return ShardedIndex(items, mapping, verifiable=False)


def _dtype(name: str | None) -> torch.dtype:
    dtype = getattr(torch, name or "", None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"unknown dtype {name!r} in a sharded checkpoint")
    return dtype


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _numel(sizes: Sequence[int]) -> int:
    total = 1
    for size in sizes:
        total *= size
    return total


def item_dtype(item: PlacedItem) -> torch.dtype:
    return _dtype(item.dtype)


def load_archive_bytes(data: bytes, weights_only: bool = True) -> Any:
    """The value a bytes item (or a foreign tensor item) holds: torch.load of its archive."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
