"""Unpickling a checkpoint's object structure safely: weights-only, on fixed-size storages that
hold no bytes yet, every failure a CheckpointError; and walking what it returns, bounded."""

from __future__ import annotations

import io
import mmap
import pickle
from collections.abc import Iterator
from typing import Any

import torch

from . import torch_internals
from .checkpoint_file import CheckpointFile
from .errors import CheckpointError, CorruptCheckpointError, NotACheckpointError, UnsafeCheckpointError
from .rebuild import storage_dtype


class LazyStorages:
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
            nbytes = int(numel) * torch_internals.element_size(dtype)
            available = self._ckpt.record_nbytes(str(key))
            if available is None or not 0 <= nbytes <= available:
                raise CorruptCheckpointError(
                    f"checkpoint {self._ckpt.path!r} is damaged: its structure claims {nbytes} bytes for storage "
                    f"data/{key}, but the file holds {available if available is not None else 'no such record'}"
                )
            storage = fixed_size_storage(nbytes)
            self.by_key[key] = storage
            self.key_of[torch_internals.storage_key(storage)] = key
        return torch_internals.typed_storage(self.by_key[key], dtype)

    def check_sizes(self) -> None:
        """A tensor that reached beyond an empty storage grew it (only those can grow): refuse that."""
        for key, storage in self.by_key.items():
            if storage.nbytes() != (self._ckpt.record_nbytes(key) or 0) and storage.resizable():
                raise CorruptCheckpointError(
                    f"checkpoint {self._ckpt.path!r} is damaged: a tensor reaches beyond its storage data/{key}"
                )


_SMALL_STORAGE = 64 << 10


def fixed_size_storage(nbytes: int) -> torch.UntypedStorage:
    """An uninitialised CPU storage of `nbytes` that cannot be resized. Large ones are anonymous
    mappings, given back to the system as soon as the storage dies."""
    if nbytes == 0:
        return torch.UntypedStorage(0)  # frombuffer refuses empty buffers; check_sizes covers these
    memory: Any = bytearray(nbytes) if nbytes < _SMALL_STORAGE else mmap.mmap(-1, nbytes)
    return torch.frombuffer(memory, dtype=torch.uint8).untyped_storage()


_MAX_NAMED_DEPTH = 1000
_MAX_OBJECTS = 10_000_000  # a walk of a loaded structure stops here: far beyond real state dicts


def walk_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted path, tensor) for every tensor under nested dicts, lists and tuples, each container
    visited once however often the structure refers to it (a hostile pickle can share one list
    at every level, a tree of 2**60 paths in a few KiB)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        prefix, item, depth = stack.pop()
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
        deep = depth >= _MAX_NAMED_DEPTH  # beyond it names stop growing (else quadratic in the depth)
        children = [
            (prefix if deep else f"{prefix}.{key}" if prefix else str(key), value, depth + 1) for key, value in items
        ]
        stack.extend(reversed(children))


def unpickle(ckpt: CheckpointFile, storages: LazyStorages, weights_only: bool, verify: bool) -> Any:
    """The object structure, every tensor on a storage of its own record's size. Whatever the
    pickle holds, the outcome is the structure or a CheckpointError."""
    data = ckpt.data_pkl(verify=verify)
    unpickler: Any
    if weights_only:
        unpickler = torch_internals.WeightsOnlyUnpickler(io.BytesIO(data), encoding="utf-8")
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
        raise NotACheckpointError(f"checkpoint {ckpt.path!r}: its object structure cannot be read ({exc})") from None
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


def structure_problem(ckpt: CheckpointFile) -> str | None:
    """Why the checkpoint's object structure cannot be loaded weights-only (a damaged or hostile
    pickle, storages larger than their records), or None; no tensor bytes are read."""
    try:
        unpickle(ckpt, LazyStorages(ckpt), weights_only=True, verify=True)
    except CheckpointError as exc:
        return str(exc)
    return None
