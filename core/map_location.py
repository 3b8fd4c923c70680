"""map_location for loads: moving every loaded storage as torch.load would, keeping shared storages shared."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import torch_internals
from .errors import CorruptCheckpointError

StorageMap = Callable[[torch.UntypedStorage], torch.UntypedStorage]


def _storage_map(map_location: Any) -> StorageMap | None:
    """How each loaded (CPU) storage is remapped; None when they stay where they are."""
    if map_location is None:
        return None
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        # torch.load's convention: fn(storage, location) -> storage; files are saved from CPU.
        def call(storage: torch.UntypedStorage) -> torch.UntypedStorage:
            result = map_location(storage, "cpu")
            moved: torch.UntypedStorage = result.untyped_storage() if hasattr(result, "untyped_storage") else result
            return moved

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
        storage = mapped[torch_internals.storage_key(obj.untyped_storage())]
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


def apply_map_location(loaded: Any, storages: dict[str, torch.UntypedStorage], map_location: Any) -> Any:
    storage_map = _storage_map(map_location)
    if storage_map is None:
        return loaded
    key = torch_internals.storage_key
    mapped = {key(s): storage_map(s) for s in storages.values()}
    if all(mapped[key(s)] is s for s in storages.values()):
        return loaded
    try:
        return _remap(loaded, mapped)
    except RecursionError:
        raise CorruptCheckpointError("the checkpoint's structure is nested too deeply to load") from None
