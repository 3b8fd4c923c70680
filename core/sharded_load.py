"""Loading a sharded checkpoint (ours, or one stock DCP wrote) at any world size.

A load into a state dict reads, for each tensor, only the box this rank holds: for a DTensor its
local chunk (global offsets and sizes, on whatever mesh the loading job built), for a plain
tensor the whole tensor. Every saved chunk that overlaps the box contributes the rows of it that
overlap, read by offset from the rank file that holds them and checked against the index's
checksums (whole checksum chunks are read and checked; only the rows needed are copied). Other
values are replaced by the checkpoint's, as torch.distributed.checkpoint.load does. A load
without a state dict returns the whole checkpoint as plain tensors, nested as it was saved.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import torch_internals
from .commit import COMMIT_RECORD, CommitRecord, read_commit_record
from .dcp_format import (
    INDEX_PREFIX,
    METADATA_FILE,
    PlacedItem,
    ShardedIndex,
    item_dtype,
    load_archive_bytes,
    parse_index,
    read_dcp_metadata,
)
from .errors import CheckpointError, CorruptCheckpointError, UncommittedCheckpointError
from .fsutil import PAGE_SIZE, buffer_of, round_up
from .manifest import digest
from .sharding import is_dtensor, local_chunk

logger = logging.getLogger(__name__)

_MAX_INDEX_BYTES = 1 << 30
_DIRECT_READ = 1 << 20  # reads at least this large (of page-aligned data) bypass the page cache


@dataclass
class ShardedCheckpoint:
    """An open sharded checkpoint: its index, and the rank files opened as they are first read."""

    directory: str
    index: ShardedIndex
    record: CommitRecord | None  # None: written by stock DCP (no commit record, no checksums)
    _fds: dict[str, int] = field(default_factory=dict)
    _opening: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        for fd in self._fds.values():
            if fd >= 0:
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _fd(self, name: str) -> int:
        with self._opening:
            return self._open(name)

    def _open(self, name: str) -> int:
        if name not in self._fds:
            try:
                self._fds[name] = os.open(os.path.join(self.directory, name), os.O_RDONLY)
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"sharded checkpoint {self.directory!r} is missing {name}, which its index names. "
                    "Use an earlier checkpoint"
                ) from None
        return self._fds[name]

    def _read(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        if nbytes >= _DIRECT_READ and offset % PAGE_SIZE == 0:
            direct = self._direct_fd(name)
            if direct is not None:
                return self._read_direct(direct, name, offset, nbytes)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self._read_into(name, offset, buffer_of(buffer), nbytes)
        return buffer

    def _read_into(self, name: str, offset: int, view: memoryview, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd(name), [view[done:]], offset + done)
            if got == 0:
                raise CorruptCheckpointError(
                    f"sharded checkpoint {self.directory!r}: {name} ends at byte {offset + done}, before the "
                    f"{nbytes} bytes its index places at {offset}. Use an earlier checkpoint"
                )
            done += got

    def _direct_fd(self, name: str) -> int | None:
        """A descriptor reading past the page cache (None where the filesystem refuses O_DIRECT):
        a cold checkpoint's bytes then reach memory once, not via the cache and a second copy."""
        key = f"{name}\0direct"
        with self._opening:
            if key not in self._fds:
                self._open(name)  # a missing file is reported as the buffered path reports it
                try:
                    self._fds[key] = os.open(os.path.join(self.directory, name), os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    self._fds[key] = -1
        fd = self._fds[key]
        return None if fd < 0 else fd

    def _read_direct(self, fd: int, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """`nbytes` from `offset` (page-aligned) through O_DIRECT, into page-aligned memory."""
        padded = round_up(nbytes)
        memory = torch.empty(padded + PAGE_SIZE, dtype=torch.uint8)
        start = (-memory.data_ptr()) % PAGE_SIZE
        buffer = memory[start : start + padded]
        view = buffer_of(buffer)
        done = 0
        try:
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    break
                done += got
        except OSError as exc:  # a filesystem that takes O_DIRECT opens but not these reads
            logger.debug("O_DIRECT read of %s refused (%s); reading through the page cache", name, exc)
            done = -1
        if done < nbytes:
            buffered = torch.empty(nbytes, dtype=torch.uint8)
            self._read_into(name, offset, buffer_of(buffered), nbytes)
            return buffered
        return buffer[:nbytes]

    def item_bytes(self, item: PlacedItem, start: int, nbytes: int, verify: bool) -> torch.Tensor:
        """`nbytes` of a tensor item's data from byte `start`, checked against its checksums."""
        assert item.data_offset is not None
        if not (verify and self.index.verifiable):
            return self._read(item.file, item.data_offset + start, nbytes)
        chunk = self.index.chunk_bytes
        first, end = start // chunk * chunk, min(math.ceil((start + nbytes) / chunk) * chunk, item.nbytes)
        data = self._read(item.file, item.data_offset + first, end - first)
        for n in range(first // chunk, math.ceil(end / chunk)):
            piece = data[n * chunk - first : min((n + 1) * chunk, end) - first]
            if n >= len(item.digests) or digest(buffer_of(piece)) != item.digests[n]:
                raise CorruptCheckpointError(
                    f"sharded checkpoint {self.directory!r} is damaged: {item.fqn!r} (in {item.file}, bytes "
                    f"{n * chunk}..{min((n + 1) * chunk, end)} of its chunk at {list(item.offsets or ())}) fails its "
                    "checksum. Use an earlier checkpoint"
                )
        return data[start - first : start - first + nbytes]

    def whole_item(self, item: PlacedItem, verify: bool) -> bytes:
        """The archive of an item (a bytes item's torch.save bytes), checked against its checksum."""
        archive = self._read(item.file, item.offset, item.length)
        data = bytes(buffer_of(archive))  # (buffer_of's tensor must outlive its view)
        checked = verify and self.index.verifiable and not item.is_tensor
        if checked and (not item.digests or digest(data) != item.digests[0]):
            raise CorruptCheckpointError(
                f"sharded checkpoint {self.directory!r} is damaged: {item.fqn!r} (in {item.file}) fails its "
                "checksum. Use an earlier checkpoint"
            )
        return data

    def value(self, fqn: str, verify: bool, weights_only: bool) -> Any:
        """The checkpoint's whole value of `fqn`: a plain tensor, or the saved object."""
        items = self.index.items[fqn]
        if not items[0].is_tensor:
            return self._load_object(items[0], verify, weights_only)
        size = _tensor_size(fqn, items)
        tensor = torch.empty(size, dtype=item_dtype(items[0]))
        self.fill(fqn, tensor, (0,) * len(size), size, verify)
        return tensor

    def _load_object(self, item: PlacedItem, verify: bool, weights_only: bool) -> Any:
        try:
            return load_archive_bytes(self.whole_item(item, verify), weights_only)
        except CorruptCheckpointError:
            raise
        except Exception as exc:
            hint = " (it holds objects a weights-only load refuses: pass weights_only=False if you trust it)"
            raise CorruptCheckpointError(
                f"sharded checkpoint {self.directory!r}: {item.fqn!r} cannot be loaded "
                f"({type(exc).__name__}: {exc}){hint if weights_only else ''}"
            ) from None

    def fill(
        self, fqn: str, target: torch.Tensor, offsets: tuple[int, ...], size: tuple[int, ...], verify: bool
    ) -> None:
        """Copy into `target` (the box at `offsets` of a tensor of global `size`) the checkpoint's values."""
        torch_internals.copy_each(self.read_box(fqn, target, offsets, size, verify))

    def read_box(
        self, fqn: str, target: torch.Tensor, offsets: tuple[int, ...], size: tuple[int, ...], verify: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(region of `target`, the checkpoint's values for it) pairs covering `target`, the box at
        `offsets` of a tensor of global `size`; everything read is verified, nothing copied yet."""
        items = self.index.items[fqn]
        if not items[0].is_tensor:
            raise ValueError(f"key {fqn!r}: the checkpoint holds an object, not a tensor")
        saved_size, dtype = _tensor_size(fqn, items), item_dtype(items[0])
        if saved_size != tuple(size) or dtype != target.dtype:
            raise ValueError(
                f"key {fqn!r}: the checkpoint holds shape {saved_size} dtype {dtype}, the state dict expects "
                f"shape {tuple(size)} dtype {target.dtype}"
            )
        pairs, covered = [], 0
        for item in items:
            box = _overlap(item, offsets, tuple(target.shape))
            if box is None:
                continue
            pairs.append((_region(target, offsets, box), self._rows(item, box, verify)))
            covered += math.prod(hi - lo for lo, hi in box)
        if covered != target.numel():
            raise CorruptCheckpointError(
                f"sharded checkpoint {self.directory!r}: the chunks of {fqn!r} cover {covered} of the "
                f"{target.numel()} elements this rank needs. Use an earlier checkpoint"
            )
        return pairs

    def _rows(self, item: PlacedItem, box: list[tuple[int, int]], verify: bool) -> torch.Tensor:
        """The part of a saved chunk inside `box` (global coordinates), reading only its rows."""
        assert item.offsets is not None and item.sizes is not None
        dtype = item_dtype(item)
        if not box:  # a 0-d tensor
            return self._tensor_of(item, 0, item.nbytes, verify).view(dtype).reshape(())
        local = [(lo - o, hi - o) for (lo, hi), o in zip(box, item.offsets)]
        row = math.prod(item.sizes[1:]) * dtype.itemsize
        first, last = local[0]
        rows = self._tensor_of(item, first * row, (last - first) * row, verify).view(dtype)
        rows = rows.reshape((last - first, *item.sizes[1:]))
        for dim, (lo, hi) in enumerate(local[1:], start=1):
            rows = rows.narrow(dim, lo, hi - lo)
        return rows

    def _tensor_of(self, item: PlacedItem, start: int, nbytes: int, verify: bool) -> torch.Tensor:
        if item.data_offset is not None:
            return self.item_bytes(item, start, nbytes, verify)
        # Stock DCP's item: a torch.save archive whose data offset the index does not record.
        tensor = load_archive_bytes(self.whole_item(item, verify))
        if not isinstance(tensor, torch.Tensor):
            raise CorruptCheckpointError(f"sharded checkpoint {self.directory!r}: {item.fqn!r} is not a tensor")
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        return flat[start : start + nbytes]

    def structure(self) -> Any:
        """Every value nested as saved, tensors as meta tensors of their global shape (no bytes read)."""
        flat = {}
        for fqn, items in self.index.items.items():
            if items[0].is_tensor:
                flat[fqn] = torch.empty(_tensor_size(fqn, items), dtype=item_dtype(items[0]), device="meta")
            else:
                flat[fqn] = self._load_object(items[0], True, True)
        return unflatten(flat, self.index.mapping)

    def problem(self, deep: bool) -> str | None:
        """Why the checkpoint cannot be loaded whole, or None; `deep` reads every byte."""
        for name in sorted({item.file for items in self.index.items.values() for item in items}):
            if not os.path.exists(os.path.join(self.directory, name)):
                return f"{name} is missing"
        try:
            for fqn, items in self.index.items.items():
                sizes = _tensor_size(fqn, items) if items[0].is_tensor else None
                if sizes is not None and sum(math.prod(i.sizes or ()) for i in items) != math.prod(sizes):
                    return f"the chunks of {fqn!r} do not cover it"
                for item in items if deep else ():
                    if item.is_tensor and item.data_offset is not None:
                        self.item_bytes(item, 0, item.nbytes, verify=True)
                    else:
                        self.whole_item(item, verify=True)
        except CorruptCheckpointError as exc:
            return str(exc)
        return None


def _tensor_size(fqn: str, items: list[PlacedItem]) -> tuple[int, ...]:
    size = items[0].size
    if size is None or any(item.size != size for item in items):
        raise CorruptCheckpointError(f"the chunks of {fqn!r} disagree on its shape")
    return size


def _overlap(item: PlacedItem, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """The global box where a saved chunk and the wanted box meet, or None when they do not."""
    assert item.offsets is not None and item.sizes is not None
    if len(item.offsets) != len(offsets):
        raise CorruptCheckpointError(f"a chunk of {item.fqn!r} has {len(item.offsets)} dimensions, not {len(offsets)}")
    box = []
    for o, s, want_o, want_s in zip(item.offsets, item.sizes, offsets, sizes):
        lo, hi = max(o, want_o), min(o + s, want_o + want_s)
        if lo >= hi:
            return None
        box.append((lo, hi))
    return box


def _region(target: torch.Tensor, offsets: tuple[int, ...], box: list[tuple[int, int]]) -> torch.Tensor:
    region = target
    for dim, ((lo, hi), o) in enumerate(zip(box, offsets)):
        region = region.narrow(dim, lo - o, hi - lo)
    return region


# ------------------------------------------------------------------------------ opening


def open_sharded(directory: str) -> ShardedCheckpoint | None:
    """The sharded checkpoint at `directory`, or None when it is not one (a file, a directory of
    per-rank files). Ours are read through their commit record and index; a directory with
    only DCP's `.metadata` is one stock DCP wrote."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    if os.path.exists(os.path.join(directory, COMMIT_RECORD)):
        record = read_commit_record(directory)
        if not record.sharded:
            return None
        _check_extra_files(directory, record)
        return ShardedCheckpoint(directory, _read_index(directory, record), record)
    if not os.path.exists(os.path.join(directory, METADATA_FILE)):
        return None
    if any(name.startswith(INDEX_PREFIX) for name in os.listdir(directory)):
        raise UncommittedCheckpointError(
            f"sharded checkpoint {directory!r} is not committed: it has no {COMMIT_RECORD}. Its save was interrupted "
            "or is still running; resume from an earlier checkpoint (core.find_latest finds one)"
        )
    return ShardedCheckpoint(directory, read_dcp_metadata(directory), None)


def committed_by_us(directory: str) -> bool:
    """Whether `directory` holds a sharded checkpoint async-ckpt committed (a commit record with an index)."""
    if not os.path.exists(os.path.join(directory, COMMIT_RECORD)):
        return False
    try:
        return read_commit_record(directory).sharded
    except CheckpointError:
        return True  # ours, damaged: our reader says how


def _check_extra_files(directory: str, record: CommitRecord) -> None:
    """The files committed beside the checkpoint (Lightning's meta.pt) must be the ones committed:
    a save overwriting the checkpoint that died after replacing one leaves a mix, never loaded."""
    for name, expected in record.extra_files.items():
        try:
            with open(os.path.join(directory, name), "rb") as extra:
                content = extra.read()
        except FileNotFoundError:
            content = None
        if content is None or digest(content) != expected:
            state = "missing" if content is None else "not the one its commit record names"
            raise CorruptCheckpointError(
                f"sharded checkpoint {directory!r}: {name} is {state} (a save overwriting this checkpoint was "
                "interrupted after replacing it). Use an earlier checkpoint"
            )


def _read_index(directory: str, record: CommitRecord) -> ShardedIndex:
    assert record.index_file is not None
    where = os.path.join(directory, record.index_file)
    try:
        with open(where, "rb") as index:
            raw = index.read(_MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"sharded checkpoint {directory!r} is damaged: its index {record.index_file} is missing"
        ) from None
    if len(raw) > _MAX_INDEX_BYTES or digest(raw) != record.index_digest:
        raise CorruptCheckpointError(
            f"sharded checkpoint {directory!r} is damaged: its index {record.index_file} does not match the digest "
            "its commit record holds. Use an earlier checkpoint"
        )
    return parse_index(raw, where)


# ------------------------------------------------------------------------------ loading


def load_sharded(
    checkpoint: ShardedCheckpoint,
    state_dict: dict[str, Any] | None,
    *,
    verify: bool = True,
    weights_only: bool = True,
    io_threads: int = 4,
) -> tuple[Any, list[str]]:
    """(state dict, missing keys): the whole checkpoint, or `state_dict` filled in place (only once
    every byte it needs has been read and verified)."""
    if state_dict is None:
        flat = {fqn: checkpoint.value(fqn, verify, weights_only) for fqn in checkpoint.index.items}
        return unflatten(flat, checkpoint.index.mapping), []
    flat_target, paths = torch_internals.flatten_state_dict(state_dict)
    missing: list[str] = []
    boxes: list[tuple[str, torch.Tensor, tuple[int, ...], tuple[int, ...]]] = []
    values: dict[str, Any] = {}
    for fqn, want in flat_target.items():
        if fqn not in checkpoint.index.items:
            missing.append(fqn)
        elif is_dtensor(want):
            boxes.append((fqn, want.to_local(), local_chunk(want)[0], tuple(want.shape)))
        elif isinstance(want, torch.Tensor):
            boxes.append((fqn, want, (0,) * want.dim(), tuple(want.shape)))
        else:
            values[fqn] = checkpoint.value(fqn, verify, weights_only)
    # Read and verify everything first: a damaged byte leaves the caller's state dict untouched.
    largest_first = sorted(boxes, key=lambda box: -box[1].numel() * box[1].element_size())
    with ThreadPoolExecutor(io_threads) as pool:
        reads = pool.map(lambda b: checkpoint.read_box(b[0], b[1], b[2], b[3], verify), largest_first)
        pairs = [pair for read in reads for pair in read]
    torch_internals.copy_each(pairs)
    for fqn, value in values.items():
        _set(state_dict, paths[fqn], value)
    return state_dict, missing


def unflatten(flat: dict[str, Any], mapping: dict[str, tuple[Any, ...]]) -> Any:
    """The nested state dict DCP's flat names and their paths describe."""
    if not mapping:  # a checkpoint without planner data: the flat names are the keys
        return flat
    nested: dict[str, Any] = torch_internals.unflatten_state_dict(flat, mapping)
    return nested


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
    """root[path[0]][path[1]]...[path[-1]] = value (lists and dicts along the way)."""
    container = root
    for key in path[:-1]:
        container = container[key]
    container[path[-1]] = value


def files_of(checkpoint: ShardedCheckpoint) -> Iterator[str]:
    for name in sorted({item.file for items in checkpoint.index.items.values() for item in items}):
        yield os.path.join(checkpoint.directory, name)
