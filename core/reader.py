"""CheckpointReader: full and partial loads, verified against the manifest, weights_only by default."""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler

from .checkpoint_file import CheckpointFile
from .commit import COMMIT_RECORD, CommitRecord, read_commit_record
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingKeysError,
    NotACheckpointError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
    WorldSizeMismatchError,
)
from .fsutil import buffer_of
from .locks import reading
from .rebuild import storage_dtype
from .types import STATE_DICT, RankInfo, default_rank_info

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedFile:
    """The file one rank reads, and the write id its commit record expects in it (None: a plain file)."""

    path: str
    write_id: str | None = None


def resolve_checkpoint_file(path: str, rank_info: RankInfo, source_rank: int | None = None) -> ResolvedFile:
    """The file holding this rank's checkpoint at `path`: the path itself, or the directory's
    file for this rank as its commit record lists it (see `_source_rank` for other world sizes).

    A directory without a commit record is read as torch's _experimental writer lays it out
    (PATH/checkpoint_<rank>.pt) when that file is a plain torch.save file; a file async-ckpt
    wrote there without committing it is an interrupted save, and absent.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError("the checkpoint path is empty; name the file or directory to load")
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise CheckpointNotFoundError(f"Checkpoint file not found: {path}")
        return ResolvedFile(path)
    if not os.path.exists(os.path.join(path, COMMIT_RECORD)):
        candidate = os.path.join(path, f"checkpoint_{rank_info.global_rank if source_rank is None else source_rank}.pt")
        if os.path.isfile(candidate) and not _written_by_us(candidate):
            return ResolvedFile(candidate)
    record = read_commit_record(path)  # UncommittedCheckpointError (a FileNotFoundError) without one
    entry = record.file_of(_source_rank(path, record, rank_info, source_rank))
    candidate = os.path.join(path, entry.file)
    if not os.path.exists(candidate):
        raise CheckpointNotFoundError(
            f"checkpoint {path!r} is committed but rank {entry.rank}'s file {entry.file} is not here. With "
            "per-node local disks each node holds only its own ranks' files: load on the node that wrote it"
        )
    return ResolvedFile(candidate, entry.write_id)


def _written_by_us(path: str) -> bool:
    try:
        with CheckpointFile(path) as ckpt:
            return ckpt.write_id is not None
    except CheckpointError:
        return False


def _source_rank(path: str, record: CommitRecord, rank_info: RankInfo, source_rank: int | None) -> int:
    """Whose file this rank loads: its own with the same world size; rank 0's when the checkpoint
    has one rank or every rank saved the same state (as DDP ranks do); else `source_rank`."""
    if source_rank is not None:
        if not 0 <= source_rank < record.world_size:
            raise ValueError(f"source_rank={source_rank}, but checkpoint {path!r} has ranks 0..{record.world_size - 1}")
        return source_rank
    if record.world_size == rank_info.global_world_size:
        return rank_info.global_rank
    if record.world_size == 1:
        return 0
    if _replicated(path, record):
        logger.info(
            "checkpoint %s: written by %d ranks with identical state; loading rank 0's on %d ranks",
            path,
            record.world_size,
            rank_info.global_world_size,
        )
        return 0
    raise WorldSizeMismatchError(
        f"checkpoint {path!r} was written by {record.world_size} ranks and this job has "
        f"{rank_info.global_world_size}. Its ranks saved different state (sharded, or per-rank values), which "
        "cannot be re-split here. Load it with the same number of ranks, or pass source_rank=k to give every "
        "rank the state rank k saved (right when the state is replicated, e.g. a DDP model and optimizer)"
    )


def _replicated(path: str, record: CommitRecord) -> bool:
    """Whether every rank's file holds the same bytes, judged from their manifests' checksums."""
    summaries = []
    for entry in record.files:
        try:
            with CheckpointFile(os.path.join(path, entry.file)) as ckpt:
                manifest = ckpt.manifest
        except CheckpointError:
            return False
        if manifest is None or manifest.get("checksum") is None:
            return False
        summaries.append((manifest["data.pkl"]["digest"], json.dumps(manifest["storages"], sort_keys=True)))
    return len(set(summaries)) == 1


class _LazyStorages:
    """Hands the unpickler one uninitialised CPU storage per record; bytes are read afterwards,
    and only for the storages a load needs. A storage the pickle claims larger than its record
    (a damaged or hostile file) is refused before any memory is allocated for it. Storages have
    a fixed size, as torch.load's have: a tensor reaching beyond its record fails to rebuild
    instead of growing the storage over bytes that are not its own."""

    def __init__(self, ckpt: CheckpointFile) -> None:
        self._ckpt = ckpt
        self.by_key: dict[str, torch.UntypedStorage] = {}
        self.key_of: dict[int, str] = {}

    def persistent_load(self, saved_id: Any) -> Any:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {saved_id!r} in checkpoint")
        _, storage_type, key, _location, numel = saved_id
        dtype = storage_dtype(storage_type)
        if key not in self.by_key:
            nbytes = int(numel) * torch._utils._element_size(dtype)
            available = self._ckpt.record_nbytes(str(key))
            if available is None or not 0 <= nbytes <= available:
                raise CorruptCheckpointError(
                    f"checkpoint {self._ckpt.path!r} is damaged: its structure claims {nbytes} bytes for storage "
                    f"data/{key}, but the file holds {available if available is not None else 'no such record'}"
                )
            storage = _fixed_size_storage(nbytes)
            self.by_key[key] = storage
            self.key_of[storage._cdata] = key
        return torch.storage.TypedStorage(wrap_storage=self.by_key[key], dtype=dtype, _internal=True)

    def check_sizes(self) -> None:
        """A tensor that reached beyond an empty storage grew it (only those can grow): refuse that."""
        for key, storage in self.by_key.items():
            if storage.nbytes() != (self._ckpt.record_nbytes(key) or 0) and storage.resizable():
                raise CorruptCheckpointError(
                    f"checkpoint {self._ckpt.path!r} is damaged: a tensor reaches beyond its storage data/{key}"
                )


_SMALL_STORAGE = 64 << 10


def _fixed_size_storage(nbytes: int) -> torch.UntypedStorage:
    """An uninitialised CPU storage of `nbytes` that cannot be resized. Large ones are anonymous
    mappings, given back to the system as soon as the storage dies."""
    if nbytes == 0:
        return torch.UntypedStorage(0)  # frombuffer refuses empty buffers; check_sizes covers these
    memory: Any = bytearray(nbytes) if nbytes < _SMALL_STORAGE else mmap.mmap(-1, nbytes)
    return torch.frombuffer(memory, dtype=torch.uint8).untyped_storage()


_MAX_OBJECTS = 10_000_000  # a walk of a loaded structure stops here: far beyond real state dicts


def _walk_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted path, tensor) for every tensor under nested dicts, lists and tuples, each container
    visited once however often the structure refers to it (a hostile pickle can share one list
    at every level, a tree of 2**60 paths in a few KiB)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        prefix, item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield prefix, item
            continue
        if isinstance(item, dict):
            items: Any = item.items()
        elif isinstance(item, (list, tuple)):
            items = enumerate(item)
        else:
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > _MAX_OBJECTS:
            raise CorruptCheckpointError(f"the checkpoint holds more than {_MAX_OBJECTS} containers")
        children = [(f"{prefix}.{key}" if prefix else str(key), value) for key, value in items]
        stack.extend(reversed(children))


StorageMap = Callable[[torch.UntypedStorage], torch.UntypedStorage]


def _storage_map(map_location: Any) -> StorageMap | None:
    """How each loaded (CPU) storage is remapped; None when they stay where they are."""
    if map_location is None:
        return None
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        # torch.load's convention: fn(storage, location) -> storage; files are saved from CPU.
        def call(storage: torch.UntypedStorage) -> torch.UntypedStorage:
            result = map_location(storage, "cpu")
            return result.untyped_storage() if hasattr(result, "untyped_storage") else result

        return call
    if isinstance(map_location, dict):
        target = map_location.get("cpu")
        if target is None:
            return None
        map_location = target
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(
            "map_location must be None, a device, a device string, a dict or a callable, "
            f"got {type(map_location).__name__}"
        )
    device = torch.device(map_location)
    if device.type == "cpu":
        return None

    def move(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        moved = torch.UntypedStorage(storage.nbytes(), device=device)
        moved.copy_(storage)
        return moved

    return move


def _remap(obj: Any, mapped: dict[int, torch.UntypedStorage], done: dict[int, Any] | None = None) -> Any:
    """`obj` with every tensor rebuilt on its remapped storage, so shared storages stay shared
    (and an object the structure holds twice is rebuilt once)."""
    done = {} if done is None else done
    if id(obj) in done:
        return done[id(obj)]
    result: Any = obj
    if isinstance(obj, torch.Tensor):
        storage = mapped[obj.untyped_storage()._cdata]
        moved = torch.empty(0, dtype=obj.dtype, device=storage.device).set_(
            storage, obj.storage_offset(), obj.shape, obj.stride()
        )
        if isinstance(obj, torch.nn.Parameter):
            result = torch.nn.Parameter(moved, requires_grad=obj.requires_grad)
        else:
            result = moved.requires_grad_(obj.requires_grad) if obj.requires_grad else moved
    elif isinstance(obj, dict):
        result = obj.copy()
        done[id(obj)] = result
        for key, value in obj.items():
            result[key] = _remap(value, mapped, done)
    elif isinstance(obj, list):
        result = []
        done[id(obj)] = result
        result.extend(_remap(v, mapped, done) for v in obj)
    elif isinstance(obj, tuple):
        items = [_remap(v, mapped, done) for v in obj]
        result = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    done[id(obj)] = result
    return result


def _apply_map_location(loaded: Any, storages: dict[str, torch.UntypedStorage], map_location: Any) -> Any:
    storage_map = _storage_map(map_location)
    if storage_map is None:
        return loaded
    mapped = {s._cdata: storage_map(s) for s in storages.values()}
    if all(mapped[s._cdata] is s for s in storages.values()):
        return loaded
    try:
        return _remap(loaded, mapped)
    except RecursionError:
        raise CorruptCheckpointError("the checkpoint's structure is nested too deeply to load") from None


class CheckpointReader:
    """Reads checkpoints written by CheckpointWriter (and any torch.save zip file).

    Every byte it reads from a file with a manifest is checked against its checksum unless
    `verify=False`; a damaged file raises CorruptCheckpointError naming the damaged record
    and the state dict keys that use it. Loads never run code from the file unless the caller
    passes weights_only=False.
    """

    def __init__(self, rank_info: RankInfo | None = None, io_threads: int = 4) -> None:
        self._rank_info = rank_info or default_rank_info()
        self._io_threads = io_threads

    def read(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        map_location: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, list[str]]:
        """Load a checkpoint; returns (state dict, missing keys).

        Without `state_dict`: the whole checkpoint. With one: only its keys are read, copied in
        place into its tensors (a shape or dtype mismatch raises ValueError naming the key),
        and only the bytes of those tensors are read; a key set to None takes the checkpoint's
        whole value. Keyword arguments: `strict=True` raises MissingKeysError (a RuntimeError)
        on keys of `state_dict` that the checkpoint lacks; `weights_only` (default True);
        `verify` (default True: check every byte read against the manifest); `source_rank`
        (read another rank's file of a directory checkpoint; see resolve_checkpoint_file).
        torch.load's `mmap` and `encoding` are accepted and have no effect; any other keyword is
        ignored with a UserWarning naming it (torch's reader ignores them silently).
        """
        options = _ReadOptions.of(kwargs)
        with reading(path):
            resolved = resolve_checkpoint_file(path, self._rank_info, options.source_rank)
            with CheckpointFile(resolved.path, legacy_ok=True) as ckpt:
                if ckpt.legacy:
                    return self._read_legacy(ckpt, state_dict, map_location, options)
                if resolved.write_id is not None and ckpt.write_id != resolved.write_id:
                    raise UncommittedCheckpointError(
                        f"checkpoint {os.fspath(path)!r} is not committed: {resolved.path} comes from a later save to "
                        "the same path than its commit record, which did not finish. Resume from an earlier checkpoint"
                    )
                storages = _LazyStorages(ckpt)
                loaded = self._unpickle(ckpt, storages, options.weights_only, options.verify)
                if state_dict is None:
                    self._fill(ckpt, storages, set(storages.by_key), loaded, options.verify)
                    return _apply_map_location(loaded, storages.by_key, map_location), []
                return self._read_into(ckpt, storages, loaded, state_dict, options)

    def _read_legacy(
        self, ckpt: CheckpointFile, state_dict: STATE_DICT | None, map_location: Any, options: _ReadOptions
    ) -> tuple[Any, list[str]]:
        """A torch.save file in the format before PyTorch 1.6: loaded whole by torch.load (no checksums)."""
        try:
            with os.fdopen(os.dup(ckpt.fd), "rb") as f:
                loaded = torch.load(f, map_location=map_location, weights_only=options.weights_only)
        except Exception as exc:  # the legacy format's every failure: damage, or refused objects
            raise NotACheckpointError(f"legacy checkpoint {ckpt.path!r} cannot be read ({exc})") from None
        if state_dict is None:
            return loaded, []
        missing: list[str] = []
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._match(loaded, state_dict, "", missing, pairs, [])
        _raise_if_strict(ckpt.path, missing, options.strict)
        _copy_pairs(pairs)
        return state_dict, missing

    def read_structure(self, path: str, *, source_rank: int | None = None, weights_only: bool = True) -> Any:
        """The checkpoint's objects with every tensor's shape and dtype, without reading tensor bytes
        (tensor values are undefined): what `inspect` shows."""
        with reading(path):
            resolved = resolve_checkpoint_file(path, self._rank_info, source_rank)
            with CheckpointFile(resolved.path) as ckpt:
                return self._unpickle(ckpt, _LazyStorages(ckpt), weights_only, verify=True)

    def _unpickle(self, ckpt: CheckpointFile, storages: _LazyStorages, weights_only: bool, verify: bool) -> Any:
        """The object structure, every tensor on a storage of its own record's size. Whatever the
        pickle holds, the outcome is the structure or a CheckpointError."""
        data = ckpt.data_pkl(verify=verify)
        unpickler: Any
        if weights_only:
            unpickler = WeightsOnlyUnpickler(io.BytesIO(data), encoding="utf-8")
        else:
            unpickler = pickle.Unpickler(io.BytesIO(data))
        unpickler.persistent_load = storages.persistent_load
        try:
            loaded = unpickler.load()
        except CheckpointError:
            raise
        except pickle.UnpicklingError as exc:
            if weights_only:
                raise UnsafeCheckpointError(
                    f"checkpoint {ckpt.path!r} holds objects that weights_only loading refuses ({exc}). "
                    "Allow the types with torch.serialization.add_safe_globals([...]), or pass "
                    "weights_only=False if, and only if, you trust the file"
                ) from None
            raise NotACheckpointError(
                f"checkpoint {ckpt.path!r}: its object structure cannot be read ({exc})"
            ) from None
        except (RuntimeError, MemoryError, RecursionError, OverflowError, IndexError, KeyError) as exc:
            # a tensor that does not fit its storage, a negative stride, an impossible size, deep nesting
            raise CorruptCheckpointError(
                f"checkpoint {ckpt.path!r} is damaged: its object structure cannot be rebuilt "
                f"({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
        except Exception as exc:  # with weights_only=False, whatever the objects' own code raises
            raise NotACheckpointError(
                f"checkpoint {ckpt.path!r}: its object structure cannot be read ({type(exc).__name__}: {exc})"
            ) from None
        storages.check_sizes()
        return loaded

    def _fill(self, ckpt: CheckpointFile, storages: _LazyStorages, keys: set[str], loaded: Any, verify: bool) -> None:
        def fill(key: str) -> str | None:
            dest = buffer_of(torch.empty(0, dtype=torch.uint8).set_(storages.by_key[key]))
            return None if ckpt.read_storage(key, dest, verify=verify) else key

        ordered = sorted(keys, key=lambda k: -storages.by_key[k].nbytes())
        with ThreadPoolExecutor(self._io_threads) as pool:
            damaged = [k for k in pool.map(fill, ordered) if k is not None]
        if damaged:
            users = [
                name for name, t in _walk_tensors(loaded) if storages.key_of.get(t.untyped_storage()._cdata) in damaged
            ]
            raise CorruptCheckpointError(
                f"checkpoint {ckpt.path!r} is damaged: record(s) {', '.join('data/' + k for k in sorted(damaged))} "
                f"fail their checksum; affected tensors: {users or 'unknown'}. Use an earlier checkpoint"
            )

    def _read_into(
        self, ckpt: CheckpointFile, storages: _LazyStorages, loaded: Any, target: STATE_DICT, options: _ReadOptions
    ) -> tuple[STATE_DICT, list[str]]:
        missing: list[str] = []
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        replaced: list[Any] = []
        self._match(loaded, target, "", missing, pairs, replaced)
        _raise_if_strict(ckpt.path, missing, options.strict)
        sources = [source for _, _, source in pairs] + [t for _, t in _walk_tensors(replaced)]
        needed = {storages.key_of[source.untyped_storage()._cdata] for source in sources}
        self._fill(ckpt, storages, needed, loaded, options.verify)
        _copy_pairs(pairs)
        return target, missing

    def _match(
        self,
        loaded: Any,
        target: dict,
        prefix: str,
        missing: list[str],
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]],
        replaced: list[Any],
    ) -> None:
        """Pair each tensor of `target` with the checkpoint's; other values are replaced by the checkpoint's."""
        for key, want in target.items():
            name = f"{prefix}{key}"
            if not isinstance(loaded, dict) or key not in loaded:
                missing.append(name)
                continue
            have = loaded[key]
            if isinstance(want, torch.Tensor):
                if not isinstance(have, torch.Tensor):
                    raise ValueError(f"key {name!r}: the checkpoint holds a {type(have).__name__}, not a tensor")
                if have.shape != want.shape or have.dtype != want.dtype:
                    raise ValueError(
                        f"key {name!r}: the checkpoint holds shape {tuple(have.shape)} dtype {have.dtype}, "
                        f"the state dict expects shape {tuple(want.shape)} dtype {want.dtype}"
                    )
                pairs.append((name, want, have))
            elif isinstance(want, dict) and isinstance(have, dict):
                self._match(have, want, f"{name}.", missing, pairs, replaced)
            else:
                target[key] = have
                replaced.append(have)


# torch.load's own keywords that a load through CheckpointReader accepts and has no use for.
_TORCH_LOAD_KEYWORDS = frozenset({"mmap", "encoding"})


@dataclass(frozen=True)
class _ReadOptions:
    strict: bool = False
    weights_only: bool = True
    verify: bool = True
    source_rank: int | None = None

    @classmethod
    def of(cls, kwargs: dict[str, Any]) -> _ReadOptions:
        names = ("strict", "weights_only", "verify", "source_rank")
        unknown = sorted(set(kwargs) - set(names) - _TORCH_LOAD_KEYWORDS)
        if unknown:  # torch's reader ignores them too; a typo (weight_only=) must not pass unseen
            warnings.warn(
                f"CheckpointReader.read() ignores unknown keyword argument(s) {unknown}; it takes "
                f"map_location, {', '.join(names)} (and torch.load's {sorted(_TORCH_LOAD_KEYWORDS)}, which it ignores)",
                UserWarning,
                stacklevel=3,
            )
        known = {name: kwargs[name] for name in names if name in kwargs}
        if known.get("weights_only") is None:
            known.pop("weights_only", None)
        return cls(**known)


def _raise_if_strict(path: str, missing: list[str], strict: bool) -> None:
    if strict and missing:
        raise MissingKeysError(f"Checkpoint at {path} is missing keys: {missing}")


def _copy_pairs(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for _, dest, source in pairs:
            dest.copy_(source)


def structure_problem(ckpt: CheckpointFile) -> str | None:
    """Why the checkpoint's object structure cannot be loaded weights-only (a damaged or hostile
    pickle, storages larger than their records), or None; no tensor bytes are read."""
    try:
        CheckpointReader(RankInfo(0, 1))._unpickle(ckpt, _LazyStorages(ckpt), weights_only=True, verify=True)
    except CheckpointError as exc:
        return str(exc)
    return None
