"""PlanCache: reusing an earlier capture's pickle for a state dict of the same skeleton."""

from __future__ import annotations

import dataclasses
import pickle
import re
import struct
from collections import OrderedDict
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

    Numbers, booleans, None and the text of strings are not part of the skeleton: the cached
    pickle is kept as a template with a slot for each, filled per save (a step counter, or a
    checkpoint path naming the step, that changes on every save does not make every save pickle
    the whole state again). Pickle shares strings by identity (its memo), so which strings are
    the same object stays in the skeleton, and a string slot is never filled with a number or
    the other way round.
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
        skeleton, scalars, storages, exact = walked
        if len(scalars) > MAX_TEMPLATE_SLOTS:  # (a vocabulary, say): no template; walk it again rarely
            self._misses[kind] = max(misses + 1, 2 * self._entries + 1)
            return capture(state_dict)
        for index, cached in enumerate(self._cached):
            if cached.skeleton == skeleton:
                plan = cached.plan_for(scalars)
                if plan is None:
                    continue
                del self._cached[index]
                self._cached.append(cached)
                self._misses.pop(kind, None)
                # This save's storages and tensors: the cache itself holds no tensor memory.
                return CapturedState(plan, storages=storages, exact=exact, memo=cached.memo)
        self._missed(kind, misses)
        captured = capture_torch(state_dict)
        template = PickleTemplate.of(state_dict, scalars, captured.plan.structure)
        entry = _CachedPlan(skeleton, dataclasses.replace(captured.plan), _scalar_keys(scalars), template)
        self._cached = [*self._cached[-(self._entries - 1) :], entry]
        captured.memo = entry.memo
        return captured

    def _missed(self, kind: Any, misses: int) -> None:
        if len(self._misses) >= 4 * self._entries:
            self._misses.clear()
        self._misses[kind] = misses + 1


_RETRY_EVERY = 8


def _kind_of(state_dict: Any) -> Any:
    """What tells apart the state dicts a caller saves in turn (a model's, an optimizer's)."""
    return tuple(state_dict) if type(state_dict) is dict else type(state_dict)


class _CachedPlan:
    """A skeleton's plan, with the numbers it was pickled with and, where one could be made, the
    template that pickles it with others."""

    def __init__(
        self, skeleton: list[Any], plan: CheckpointPlan, scalar_keys: list[Any], template: PickleTemplate | None
    ) -> None:
        self.skeleton = skeleton
        self.memo: dict[Any, Any] = {}
        # The last plan with the numbers it holds, replaced as one (a Ctrl-C between two separate
        # assignments would pair a pickle with another save's numbers).
        self._last: tuple[list[Any], CheckpointPlan] = (scalar_keys, plan)
        self._template = template

    def plan_for(self, scalars: list[Any]) -> CheckpointPlan | None:
        """The plan of this skeleton with `scalars` in its slots (None: no template, other numbers)."""
        keys = _scalar_keys(scalars)
        last_keys, plan = self._last
        if keys != last_keys:
            if self._template is None:
                return None
            plan = dataclasses.replace(plan, structure=self._template.render(scalars))
            self._last = (keys, plan)
        return dataclasses.replace(plan)


def _scalar_keys(scalars: list[Any]) -> list[Any]:
    """What tells the pickles of two lists of numbers apart: type and value (0.0 from -0.0, NaNs)."""
    return [(type(value), value.hex() if type(value) is float else value) for value in scalars]


class PickleTemplate:
    """A state dict's pickle with a slot for each number, boolean, None and string in it, filled
    per save.

    Made by pickling a copy of the state in which every such value is a distinct marker (a float
    for the others, a string for a string; one marker per string object, so the memo shares the
    same ones and nothing else in the pickle moves), then split at the markers. Kept only if
    filling it with the state's own values gives its real pickle.
    """

    def __init__(self, segments: list[bytes], order: list[int]) -> None:
        self._segments = segments  # the pickle between the slots
        self._order = order  # for each slot, in the pickle's order: the value's index in walk order

    @classmethod
    def of(cls, state_dict: Any, scalars: list[Any], real: bytes) -> PickleTemplate | None:
        """The template of `state_dict`'s pickle `real` (its skeleton walk found `scalars`), or None."""
        if not scalars:
            return None
        try:
            marked = _MarkedCopy().of(state_dict)
            pickled = capture_torch(marked).plan.structure
        except Exception:
            return None
        places = []  # (where, slot index, length), in the pickle's order: one pass over it
        for match in _MARKERS.finditer(pickled):
            digits = match.group(1)
            index = int(digits) if digits is not None else int.from_bytes(match.group()[1:], "big") & _MANTISSA
            if index >= len(scalars):
                return None
            expected = _string_marker(index) if type(scalars[index]) is str else _marker(index)
            if match.group() != _encoded(expected):
                return None
            places.append((match.start(), index, len(match.group())))
        if sorted(index for _, index, _ in places) != list(range(len(scalars))):
            return None  # a marker missing, or one found twice (other bytes that look like one)
        segments, start = [], 0
        for at, _, length in places:
            segments.append(pickled[start:at])
            start = at + length
        segments.append(pickled[start:])
        template = cls(segments, [index for _, index, _ in places])
        return template if template.render(scalars) == real else None

    def render(self, scalars: list[Any]) -> bytes:
        """The pickle with `scalars` (in walk order) in its slots."""
        parts = [self._segments[0]]
        for index, segment in zip(self._order, self._segments[1:]):
            parts.append(_encoded(scalars[index]))
            parts.append(segment)
        return b"".join(parts)


def _encoded(value: Any) -> bytes:
    """How torch.save's pickle (protocol 2) writes a number, boolean or None (one opcode), or a
    string (its opcode, length and UTF-8 text; the memo opcode after it is the template's)."""
    if type(value) is str:
        text = value.encode("utf-8", "surrogatepass")
        return pickle.BINUNICODE + struct.pack("<I", len(text)) + text
    return pickle.dumps(value, protocol=2)[2:-1]


def _marker(index: int) -> float:
    return -float.fromhex(f"0x1.{index:013x}p-1021")  # the index in the mantissa


# Above this many slots, filling the template costs about what pickling the state does.
MAX_TEMPLATE_SLOTS = 2_000
_MANTISSA = (1 << 52) - 1
# Either marker as torch.save's pickle writes it: a float marker (BINFLOAT, sign set, exponent
# -1021, the index in the mantissa) or a string marker (BINUNICODE, its length, its text).
_MARKERS = re.compile(rb"G\x80[\x20-\x2f].{6}|X.{4}\x00async-ckpt slot (\d+)\x00", re.DOTALL)


def _string_marker(index: int) -> str:
    return f"\x00async-ckpt slot {index}\x00"


class _MarkedCopy:
    """A copy of a state dict's containers, each number, boolean, None and string replaced by its marker
    (numbered in the skeleton walk's order), the same object wherever the original shares one."""

    def __init__(self) -> None:
        self._count = 0
        self._copies: dict[int, Any] = {}

    def of(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _SLOTTED:
            self._count += 1
            return _marker(self._count - 1)
        if id(obj) in self._copies:
            return self._copies[id(obj)]
        copy: Any
        if kind is str:
            self._count += 1
            copy = _string_marker(self._count - 1)
            self._copies[id(obj)] = copy
        elif kind is dict or kind is OrderedDict:
            copy = kind()
            self._copies[id(obj)] = copy
            for key, value in obj.items():
                marked_key = self.of(key)  # (the key first, as the walk and pickle take them)
                copy[marked_key] = self.of(value)
            if kind is OrderedDict and obj.__dict__:
                copy.__dict__.update(self.of(obj.__dict__))
        elif kind is list:
            copy = []
            self._copies[id(obj)] = copy
            copy.extend(self.of(value) for value in obj)
        elif kind is tuple:
            copy = tuple(self.of(value) for value in obj)
            self._copies[id(obj)] = copy
        else:
            copy = obj  # strings, bytes and tensors, as they are
        return copy


def _walk_skeleton(
    state_dict: Any,
) -> tuple[list[Any], list[Any], list[torch.UntypedStorage], list[torch.Tensor | None]] | None:
    """(skeleton, its numbers, booleans, Nones and strings in order, storages in the order the
    pickle names them, each one's exact tensor (see CapturedState)), or None when it cannot be cached."""
    walk = _SkeletonWalk()
    try:
        walk.visit(state_dict)
    except Exception:  # an object the skeleton does not describe, or a tensor without strides
        return None
    found = walk.storages.values()
    return walk.skeleton, walk.scalars, [storage for _, storage, _ in found], [tensor for _, _, tensor in found]


_SLOTTED = frozenset({int, bool, float, type(None)})  # values pickle writes in place, never memoized
_SLOT = ("slot",)  # such a value's entry in a skeleton
_STRING_SLOT = ("string slot",)  # a string's first appearance (pickle memoizes strings, not numbers)
_ATTRIBUTES = ("attributes",)  # an OrderedDict's attributes follow


class _SkeletonWalk:
    """One walk of a state dict for PlanCache. A class, not a recursive closure: a closure that
    calls itself is a reference cycle, and this one would keep every storage of the state alive
    (a whole model's memory, per save) until Python's cyclic garbage collector happens to run."""

    def __init__(self) -> None:
        self.skeleton: list[Any] = []
        self.scalars: list[Any] = []
        # storage id -> (index in the pickle, storage, its exact tensor or None)
        self.storages: dict[int, tuple[int, torch.UntypedStorage, torch.Tensor | None]] = {}
        self._seen: dict[int, int] = {}

    def visit(self, obj: Any) -> None:
        # Hot: a large model's optimizer state holds thousands of tensors, walked on every save.
        append = self.skeleton.append
        kind = type(obj)
        if kind in _SLOTTED:
            append(_SLOT)
            self.scalars.append(obj)
            return
        seen = self._seen
        identity = id(obj)
        if identity in seen:
            append(seen[identity])  # the same object again: pickle writes a memo reference
            return
        seen[identity] = -len(seen) - 1
        if kind is str:
            append(_STRING_SLOT)
            self.scalars.append(obj)
        elif kind is bytes:
            append(obj)
        elif kind is dict or kind is OrderedDict:
            append((kind, len(obj)))
            visit = self.visit
            for key, value in obj.items():
                visit(key)
                visit(value)
            if kind is OrderedDict and obj.__dict__:
                # Its attributes (a module state dict's `_metadata`) are pickled after its items.
                append(_ATTRIBUTES)
                visit(obj.__dict__)
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
