"""Repeated saves (dedupe_key): telling that a state is unchanged since the previous save without
reading its bytes, so that the new file can share the previous one's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import torch_internals
from .plan import CheckpointPlan
from .slab import StagingLease


def tensor_versions(state_dict: Any) -> tuple[Any, ...] | None:
    """Every tensor's storage, place and version counter, in order; equal results mean no tensor
    was replaced or changed in place by a PyTorch operation since (writes through `.data` and
    some fused optimizer kernels do not count versions). None when the state dict holds objects
    other than containers, plain values and tensors."""
    found: list[tuple[Any, ...]] = []
    stack = [state_dict]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            version = torch_internals.version_counter(obj)
            found.append((storage.data_ptr(), storage.nbytes(), obj.storage_offset(), version, obj.device))
        elif isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))
        elif isinstance(obj, (list, tuple)):
            stack.extend(reversed(obj))
        elif not isinstance(obj, (str, int, float, bool, bytes, type(None), torch.dtype, torch.device)):
            return None
    return tuple(found)


@dataclass(frozen=True)
class LastSave:
    """The previous save: its plan and its slab's lease (the same bytes, should a link be
    impossible), not its staged dict, which would be copied out when the slab is reused."""

    key: Any
    versions: tuple[Any, ...]
    kwargs: dict[str, Any]
    plan: CheckpointPlan
    lease: StagingLease
    path: str


PlanOf = Callable[[Any, str], CheckpointPlan]


class RepeatedSaves:
    """Remembers the previous save of one checkpointer and tells whether a new one repeats it:
    the same key, the same keyword arguments, the same pickled structure and the same tensors
    with the same version counters."""

    def __init__(self) -> None:
        self._last: LastSave | None = None

    def versions(self, key: Any, state_dict: Any) -> tuple[Any, ...] | None:
        """What the save of `state_dict` is compared by (None: no key, or a state it cannot judge)."""
        return None if key is None else tensor_versions(state_dict)

    def repeat_of(
        self, key: Any, versions: tuple[Any, ...] | None, state_dict: Any, kwargs: dict[str, Any], plan_of: PlanOf
    ) -> LastSave | None:
        """The previous save when this one repeats it, else None."""
        last = self._last
        if versions is None or last is None or versions != last.versions:
            return None
        if not _equal(last.key, key) or not _equal(last.kwargs, kwargs):
            return None
        if plan_of(state_dict, kwargs.get("file_format", "torch")).structure != last.plan.structure:
            return None
        return last

    def remember(
        self,
        key: Any,
        versions: tuple[Any, ...] | None,
        kwargs: dict[str, Any],
        plan: CheckpointPlan | None,
        lease: StagingLease | None,
        path: str,
    ) -> None:
        """What the next save is compared with (nothing when this save had no key or no snapshot yet)."""
        if versions is None or plan is None or lease is None:
            self._last = None
        else:
            self._last = LastSave(key, versions, dict(kwargs), plan, lease, path)

    def repeated_at(self, last: LastSave, path: str) -> None:
        """The previous save was repeated at `path`: a later repeat links to that file."""
        self._last = dataclasses.replace(last, path=path)


def _equal(a: Any, b: Any) -> bool:
    """a == b, False where the comparison is not a plain truth value (e.g. tensors)."""
    try:
        return bool(a == b)
    except Exception:
        return False
