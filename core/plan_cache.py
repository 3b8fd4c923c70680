"""PlanCache: reusing an earlier capture's pickle for a state dict of the same skeleton."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from . import torch_internals
from .capture import capture, capture_torch
from .plan import CapturedState, CheckpointPlan, exact_tensor


class PlanCache:
    """Reuses an earlier capture's pickle for a state dict of the same skeleton.

    Pickling a large state dict (thousands of tensors with optimizer state) costs tens of
    milliseconds of Python; walking it to compare with earlier saves costs a few. The
    skeleton records everything the pickle depends on: container types and lengths, keys and
    plain values in order, which objects are the same object (pickle's memo), and each tensor's
    type, dtype, shape, stride, offset, device, requires_grad and storage (by first appearance
    and size). An equal skeleton means torch.save would write the same data.pkl, so only the
    storage list is rebuilt. Anything else (custom objects, tensor subclasses) is captured anew.
    The last `entries` skeletons are kept, for callers that save several state dicts in turn
    (Accelerate's model, optimizer and scheduler files).
    """

    def __init__(self, entries: int = 8) -> None:
        self._entries = entries
        self._cached: list[_CachedPlan] = []  # most recent last
        self._misses: dict[Any, int] = {}  # consecutive misses, by the state dict's top-level keys

    def clear(self) -> None:
        self._cached = []
        self._misses = {}

    def capture(self, state_dict: Any, file_format: str = "torch") -> CapturedState:
        if file_format != "torch":
            return capture(state_dict, file_format)
        # A state whose plain values change on every save (Lightning's step counters, RNG states)
        # never matches: after a few misses its walk is skipped, and tried again now and then.
        kind = _kind_of(state_dict)
        misses = self._misses.get(kind, 0)
        if misses >= 2 * self._entries and misses % _RETRY_EVERY:  # (fewer: states saved in turn fill the cache)
            self._misses[kind] = misses + 1
            return capture(state_dict)
        walked = _walk_skeleton(state_dict)
        if walked is None:
            self._missed(kind, misses)
            return capture(state_dict)
        skeleton, storages, exact = walked
        for index, cached in enumerate(self._cached):
            if cached.skeleton == skeleton:
                del self._cached[index]
                self._cached.append(cached)
                self._misses.pop(kind, None)
                # This save's storages and tensors: the cache itself holds no tensor memory.
                plan = dataclasses.replace(cached.plan)
                return CapturedState(plan, storages=storages, exact=exact, memo=cached.memo)
        self._missed(kind, misses)
        captured = capture_torch(state_dict)
        self._cached = [
            *self._cached[-(self._entries - 1) :],
            _CachedPlan(skeleton, dataclasses.replace(captured.plan)),
        ]
        return captured

    def _missed(self, kind: Any, misses: int) -> None:
        if len(self._misses) >= 4 * self._entries:
            self._misses.clear()
        self._misses[kind] = misses + 1


_RETRY_EVERY = 8


def _kind_of(state_dict: Any) -> Any:
    """What tells apart the state dicts a caller saves in turn (a model's, an optimizer's)."""
    return tuple(state_dict) if type(state_dict) is dict else type(state_dict)


@dataclass(frozen=True)
class _CachedPlan:
    skeleton: list[Any]
    plan: CheckpointPlan
    memo: dict[Any, Any] = dataclasses.field(default_factory=dict)


_SCALAR_TYPES = frozenset({int, bool, type(None)})


def _walk_skeleton(
    state_dict: Any,
) -> tuple[list[Any], list[torch.UntypedStorage], list[torch.Tensor | None]] | None:
    """(skeleton, storages in the order the pickle names them, each one's exact tensor (see
    CapturedState)), or None when it cannot be cached."""
    walk = _SkeletonWalk()
    try:
        walk.visit(state_dict)
    except Exception:  # an object the skeleton does not describe, or a tensor without strides
        return None
    found = walk.storages.values()
    return walk.skeleton, [storage for _, storage, _ in found], [tensor for _, _, tensor in found]


class _SkeletonWalk:
    """One walk of a state dict for PlanCache. A class, not a recursive closure: a closure that
    calls itself is a reference cycle, and this one would keep every storage of the state alive
    (a whole model's memory, per save) until Python's cyclic garbage collector happens to run."""

    def __init__(self) -> None:
        self.skeleton: list[Any] = []
        # storage id -> (index in the pickle, storage, its exact tensor or None)
        self.storages: dict[int, tuple[int, torch.UntypedStorage, torch.Tensor | None]] = {}
        self._seen: dict[int, int] = {}

    def visit(self, obj: Any) -> None:
        # Hot: a large model's optimizer state holds thousands of tensors, walked on every save.
        append = self.skeleton.append
        kind = type(obj)
        if kind in _SCALAR_TYPES:
            append((kind, obj))
            return
        if kind is float:
            append(obj.hex())  # tells 0.0 from -0.0, which compare equal
            return
        seen = self._seen
        identity = id(obj)
        if identity in seen:
            append(seen[identity])  # the same object again: pickle writes a memo reference
            return
        seen[identity] = -len(seen) - 1
        if kind is str or kind is bytes:
            append(obj)
        elif kind is dict or kind is OrderedDict:
            append((kind, len(obj)))
            visit = self.visit
            for key, value in obj.items():
                visit(key)
                visit(value)
        elif kind is list or kind is tuple:
            append((kind, len(obj)))
            visit = self.visit
            for value in obj:
                visit(value)
        elif (kind is torch.Tensor or kind is torch.nn.Parameter) and not obj.__dict__:
            storage = obj.untyped_storage()
            nbytes = storage.nbytes()
            offset, conj, neg = obj.storage_offset(), obj.is_conj(), obj.is_neg()
            key = torch_internals.storage_key(storage)
            storages = self.storages
            found = storages.get(key)
            if found is None or found[2] is None:
                found = (found[0] if found else len(storages), storage, exact_tensor(obj, storage))
                storages[key] = found
            append(
                (
                    kind,
                    obj.dtype,
                    obj.shape,
                    obj.stride(),
                    offset,
                    obj.device,
                    obj.requires_grad,
                    conj,
                    neg,
                    obj.layout,
                    found[0],
                    nbytes,
                )
            )
        else:
            raise TypeError(kind)
