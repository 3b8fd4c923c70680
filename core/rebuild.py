"""Rebuilding a state dict from a plan and its storages, as torch.load would (the inverse of capture)."""

from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Sequence
from typing import Any

import torch

from . import torch_internals
from .plan import CheckpointPlan


@functools.cache
def _dtypes_of_legacy_storage_types() -> dict[Any, torch.dtype]:
    return {getattr(torch, name): dtype for dtype, name in torch_internals.storage_type_names().items()}


def storage_dtype(storage_type: Any) -> torch.dtype:
    """The dtype a pickled storage reference names (without the TypedStorage deprecation warning
    that asking a legacy storage class for its dtype prints)."""
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    legacy = _dtypes_of_legacy_storage_types().get(storage_type)
    return legacy if legacy is not None else storage_type.dtype


def materialize(plan: CheckpointPlan, storages: Sequence[torch.UntypedStorage]) -> Any:
    """The state dict `plan` describes, its tensors built on `storages` (one per storage of the
    plan, aliased, not copied): the inverse of capture, as torch.load would rebuild it."""
    if plan.format == "safetensors":
        from .safetensors_format import materialize_safetensors

        return materialize_safetensors(plan.structure, storages)
    if plan.format == "dcp":
        from .sharded_plan import materialize_sharded

        return materialize_sharded(plan.structure, storages)

    def persistent_load(saved_id: Any) -> Any:
        _, storage_type, key, _location, _numel = saved_id
        return torch_internals.typed_storage(storages[int(key)], storage_dtype(storage_type))

    unpickler = pickle.Unpickler(io.BytesIO(plan.structure))
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()
