"""The plan of one checkpoint: what crosses from the trainer to the writer.

`capture` pickles the state dict exactly as `torch.save` would (same `data.pkl`: tensors as
`_rebuild_tensor_v2`/`v3` or `_rebuild_parameter` calls whose storages are persistent
references "0", "1", ...), but without touching tensor bytes, and lists the storages those
references name. The plan (the pickle plus storage sizes) is a few KiB and is all that
crosses the pipe; the bytes go through shared memory. The writer never unpickles anything,
so user classes need not be importable in the writer process.

Tensors that share a storage (tied weights, views) keep sharing it with their own sizes,
strides and offsets, so the saved file has exactly the aliasing of the live state.
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import io
import json
import pickle
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedStateError
from .fsutil import PAGE_SIZE, round_up


@dataclass(frozen=True)
class StorageMeta:
    """One storage: record `data/<index>` in the file, at `slab_offset` in the staging slab."""

    slab_offset: int
    nbytes: int


@dataclass(frozen=True)
class Lineage:
    """Where an incremental save stands among the saves of one state-dict shape.

    `name` identifies the shape; `sequence` numbers this save, `previous` the save before it
    of the same shape (None for the first). `digests[i]` are storage i's chunk digests (of
    `chunk_bytes` each) when the stager computed them, else None. The writer copies chunks
    whose digest matches the previous file's from that file, if it committed `previous`.
    """

    name: str
    sequence: int
    previous: int | None
    chunk_bytes: int
    digests: tuple[list[str] | None, ...]


@dataclass
class CheckpointPlan:
    """Everything the writer needs besides the bytes.

    For format "torch", `structure` is torch.save's data.pkl; for "safetensors", the file's
    JSON header. `storages` lists the byte ranges, in the order the file holds them.
    `lineage` is set for incremental saves.
    """

    structure: bytes
    storages: list[StorageMeta]
    slab_nbytes: int
    format: str = "torch"
    lineage: Lineage | None = None

    @property
    def slab_shape(self) -> tuple:
        """What makes two plans' slabs interchangeable: format and every storage's place and size."""
        return (self.format, self.slab_nbytes, tuple((s.slab_offset, s.nbytes) for s in self.storages))


@dataclass
class CapturedState:
    """A plan plus, per storage, the live bytes (a uint8 view, CPU or CUDA) still to be copied."""

    plan: CheckpointPlan
    sources: list[torch.Tensor]

    @property
    def devices(self) -> set[torch.device]:
        return {s.device for s in self.sources}


class _StorageRef:
    """Stands for storage `key` in the pickle; becomes torch's persistent storage id."""

    __slots__ = ("key", "storage_type", "numel")

    def __init__(self, key: str, storage_type: Any, numel: int) -> None:
        self.key, self.storage_type, self.numel = key, storage_type, numel


@functools.cache
def _dtypes_of_legacy_storage_types() -> dict[Any, torch.dtype]:
    return {getattr(torch, name): dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


def storage_dtype(storage_type: Any) -> torch.dtype:
    """The dtype a pickled storage reference names (without the TypedStorage deprecation warning
    that asking a legacy storage class for its dtype prints)."""
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    legacy = _dtypes_of_legacy_storage_types().get(storage_type)
    return legacy if legacy is not None else storage_type.dtype


@functools.cache
def _legacy_storage_type(dtype: torch.dtype) -> Any:
    """The storage class torch.save names for `dtype` (UntypedStorage for newer dtypes)."""
    if dtype in torch.storage._new_dtypes():
        return torch.UntypedStorage
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


def _check_tensor(tensor: torch.Tensor) -> None:
    kind = f"tensor of shape {tuple(tensor.shape)} and dtype {tensor.dtype}"
    if tensor.is_meta:
        raise UnsupportedStateError(
            f"cannot checkpoint a meta {kind}: it holds no data; materialise it (to_empty + init) first"
        )
    if tensor.is_quantized:
        raise UnsupportedStateError(
            f"cannot checkpoint a quantized {kind} ({tensor.qscheme()}): async-ckpt saves dense tensors; "
            "save tensor.dequantize() or use torch.save for quantized models"
        )
    if tensor.layout != torch.strided:
        raise UnsupportedStateError(
            f"cannot checkpoint a {kind} with layout {tensor.layout}: convert it to a dense tensor (to_dense()) first"
        )


_PLAIN_TYPES = frozenset(
    {
        str,
        int,
        float,
        bool,
        type(None),
        tuple,
        list,
        dict,
        OrderedDict,
        bytes,
        torch.Tensor,
        torch.nn.Parameter,
        torch.dtype,
        torch.device,
        torch.Size,
    }
)


class _CapturePickler(pickle.Pickler):
    """torch.save's pickling, with storages collected instead of serialised."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=2)
        self.storages: list[torch.UntypedStorage] = []
        self._refs: dict[tuple[str, int], tuple[_StorageRef, torch.dtype]] = {}
        self.dispatch_table = copyreg.dispatch_table.copy()
        self.dispatch_table[torch.Tensor] = self._reduce_tensor
        self.dispatch_table[torch.nn.Parameter] = self._reduce_parameter

    def release(self) -> list[torch.UntypedStorage]:
        """The storages collected; the pickler lets go of them and of itself. Its dispatch table
        holds its own bound methods, a reference cycle that would otherwise keep every storage of
        the state alive until Python's cyclic garbage collector runs."""
        storages, self.storages = self.storages, []
        self.dispatch_table = {}
        self._refs = {}
        return storages

    def _storage_ref(self, tensor: torch.Tensor) -> _StorageRef:
        storage = tensor.untyped_storage()
        identity = (str(storage.device), storage._cdata)
        if identity not in self._refs:
            storage_type = _legacy_storage_type(tensor.dtype)
            numel = (
                storage.nbytes() if storage_type is torch.UntypedStorage else storage.nbytes() // tensor.element_size()
            )
            self._refs[identity] = (_StorageRef(str(len(self.storages)), storage_type, numel), tensor.dtype)
            self.storages.append(storage)
        ref, dtype = self._refs[identity]
        if dtype != tensor.dtype:
            raise UnsupportedStateError(
                f"cannot checkpoint tensors that view the same memory as different dtypes ({dtype} and "
                f"{tensor.dtype}); torch.load cannot restore that sharing. Save a .clone() of one of them"
            )
        return ref

    def _reduce_tensor(self, tensor: torch.Tensor) -> tuple:
        """torch.save's reduction of a dense tensor (Tensor.__reduce_ex__), storages by reference."""
        _check_tensor(tensor)
        ref = self._storage_ref(tensor)
        args: tuple = (
            ref,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.requires_grad,
            OrderedDict(),
        )
        metadata = torch._utils.get_tensor_metadata(tensor)  # the conjugate and negative bits
        rebuild: Any = torch._utils._rebuild_tensor_v2
        if ref.storage_type is torch.UntypedStorage:
            rebuild, args = torch._utils._rebuild_tensor_v3, (*args, tensor.dtype)
        if metadata:
            args = (*args, metadata)
        state = torch._utils._get_obj_state(tensor)
        if state:  # Python attributes set on the tensor, which torch.save keeps
            return torch._tensor._rebuild_from_type_v2, (rebuild, type(tensor), args, state)
        return rebuild, args

    def _reduce_parameter(self, parameter: torch.nn.Parameter) -> tuple:
        state = torch._utils._get_obj_state(parameter)
        if state:
            return torch._utils._rebuild_parameter_with_state, (
                parameter.data,
                parameter.requires_grad,
                OrderedDict(),
                state,
            )
        return torch._utils._rebuild_parameter, (parameter.data, parameter.requires_grad, OrderedDict())

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled: the common types leave after one set lookup.
        kind = type(obj)
        if kind in _PLAIN_TYPES:
            return None
        if kind is _StorageRef:
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        if isinstance(obj, torch.Tensor) and type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsupportedStateError(
                f"cannot checkpoint a {type(obj).__name__} of shape {tuple(obj.shape)}: only plain tensors and "
                "nn.Parameter are supported; convert it (e.g. .full_tensor() or .to_local()) first"
            )
        if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
            raise UnsupportedStateError("cannot checkpoint a bare torch storage; save a tensor that views it instead")
        return None


def capture(state_dict: Any, file_format: str = "torch") -> CapturedState:
    """Plan a checkpoint of `state_dict` in `file_format` ("torch" or "safetensors")."""
    if file_format == "safetensors":
        return capture_safetensors(state_dict)
    if file_format != "torch":
        raise ValueError(f"unknown checkpoint format {file_format!r}; use 'torch' or 'safetensors'")
    return capture_torch(state_dict)


def capture_torch(state_dict: Any) -> CapturedState:
    """Pickle `state_dict` as torch.save would and plan the copy of its tensor bytes.

    Non-tensor values are deep-copied by the pickling, so later changes to them do not reach
    the checkpoint. Raises UnsupportedStateError, before anything is written, for values that
    cannot be checkpointed (lambdas, open files, meta and quantized tensors). A tensor that is
    part of an autograd graph is saved as torch.save saves it: its values and requires_grad.
    """
    buffer = io.BytesIO()
    pickler = _CapturePickler(buffer)
    try:
        pickler.dump(state_dict)
    except UnsupportedStateError:
        raise
    except Exception as exc:
        raise UnsupportedStateError(
            f"cannot checkpoint this state dict: a value cannot be pickled ({type(exc).__name__}: {exc}). "
            "Checkpoints may hold tensors, numbers, strings, containers and picklable objects; "
            "remove open files, lambdas, locks and similar values before saving"
        ) from exc
    finally:
        storages = pickler.release()
    sources = [_bytes_of(storage, 0, storage.nbytes()) for storage in storages]
    return _captured(buffer.getvalue(), sources, "torch")


def _bytes_of(storage: torch.UntypedStorage, start: int, nbytes: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, start, (nbytes,), (1,))


def _captured(structure: bytes, sources: list[torch.Tensor], file_format: str) -> CapturedState:
    storages: list[StorageMeta] = []
    slab_offset = 0
    for source in sources:
        storages.append(StorageMeta(slab_offset=slab_offset, nbytes=source.numel()))
        slab_offset += round_up(source.numel())
    plan = CheckpointPlan(structure, storages, max(slab_offset, PAGE_SIZE), file_format)
    return CapturedState(plan=plan, sources=sources)


SAFETENSORS_METADATA = {"format": "pt"}  # what safetensors.torch and Accelerate write, and their loaders expect


def capture_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> CapturedState:
    """Plan a safetensors file of the flat dict `tensors` (names to tensors, no shared storage).

    Non-contiguous tensors are made contiguous here, on the calling thread, as
    safetensors.torch.save_file does. The header is padded so that the data starts on a page.
    """
    from safetensors.torch import _TYPES

    codes = {dtype: code for code, dtype in _TYPES.items()}
    header: dict[str, Any] = {"__metadata__": SAFETENSORS_METADATA if metadata is None else metadata}
    sources: list[torch.Tensor] = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedStateError(f"safetensors holds only tensors; {name!r} is a {type(tensor).__name__}")
        _check_tensor(tensor)
        if tensor.dtype not in codes:
            raise UnsupportedStateError(f"safetensors cannot store {name!r} of dtype {tensor.dtype}")
        tensor = tensor.detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": codes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        start = int(tensor.storage_offset()) * tensor.element_size()
        sources.append(_bytes_of(tensor.untyped_storage(), start, nbytes))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = round_up(8 + len(text)) - 8
    structure = struct.pack("<Q", padded) + text + b" " * (padded - len(text))
    return _captured(structure, sources, "safetensors")


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

    def clear(self) -> None:
        self._cached = []

    def capture(self, state_dict: Any, file_format: str = "torch") -> CapturedState:
        if file_format != "torch":
            return capture(state_dict, file_format)
        walked = _walk_skeleton(state_dict)
        if walked is None:
            return capture_torch(state_dict)
        skeleton, storages = walked
        for index, cached in enumerate(self._cached):
            if cached.skeleton == skeleton:
                del self._cached[index]
                self._cached.append(cached)
                # Byte views of this save's storages: the cache itself holds no tensor memory.
                sources = [_bytes_of(storage, 0, storage.nbytes()) for storage in storages]
                return CapturedState(plan=dataclasses.replace(cached.plan), sources=sources)
        captured = capture_torch(state_dict)
        self._cached = [
            *self._cached[-(self._entries - 1) :],
            _CachedPlan(skeleton, dataclasses.replace(captured.plan)),
        ]
        return captured


@dataclass(frozen=True)
class _CachedPlan:
    skeleton: list[Any]
    plan: CheckpointPlan


_SCALAR_TYPES = frozenset({int, bool, type(None)})


def _walk_skeleton(state_dict: Any) -> tuple[list[Any], list[torch.UntypedStorage]] | None:
    """(skeleton, storages in the order the pickle names them), or None when it cannot be cached."""
    walk = _SkeletonWalk()
    try:
        walk.visit(state_dict)
    except Exception:  # an object the skeleton does not describe, or a tensor without strides
        return None
    return walk.skeleton, [storage for _, storage in walk.storages.values()]


class _SkeletonWalk:
    """One walk of a state dict for PlanCache. A class, not a recursive closure: a closure that
    calls itself is a reference cycle, and this one would keep every storage of the state alive
    (a whole model's memory, per save) until Python's cyclic garbage collector happens to run."""

    def __init__(self) -> None:
        self.skeleton: list[Any] = []
        self.storages: dict[int, tuple[int, torch.UntypedStorage]] = {}  # id -> (index in the pickle, storage)
        self._seen: dict[int, int] = {}

    def visit(self, obj: Any) -> None:
        skeleton = self.skeleton
        kind = type(obj)
        if kind in _SCALAR_TYPES:
            skeleton.append((kind, obj))
            return
        if kind is float:
            skeleton.append(obj.hex())  # tells 0.0 from -0.0, which compare equal
            return
        if id(obj) in self._seen:
            skeleton.append(self._seen[id(obj)])  # the same object again: pickle writes a memo reference
            return
        self._seen[id(obj)] = -len(self._seen) - 1
        if kind is str or kind is bytes:
            skeleton.append(obj)
        elif kind is dict or kind is OrderedDict:
            skeleton.append((kind, len(obj)))
            for key, value in obj.items():
                self.visit(key)
                self.visit(value)
        elif kind is list or kind is tuple:
            skeleton.append((kind, len(obj)))
            for value in obj:
                self.visit(value)
        elif (kind is torch.Tensor or kind is torch.nn.Parameter) and not obj.__dict__:
            storage = obj.untyped_storage()
            index = self.storages.setdefault(storage._cdata, (len(self.storages), storage))[0]
            skeleton.append(
                (
                    kind,
                    obj.dtype,
                    obj.shape,
                    obj.stride(),
                    obj.storage_offset(),
                    obj.device,
                    obj.requires_grad,
                    obj.is_conj(),
                    obj.is_neg(),
                    obj.layout,
                    index,
                    storage.nbytes(),
                )
            )
        else:
            raise TypeError(kind)


def materialize(plan: CheckpointPlan, storages: Sequence[torch.UntypedStorage]) -> Any:
    """The state dict `plan` describes, its tensors built on `storages` (one per storage of the
    plan, aliased, not copied): the inverse of capture, as torch.load would rebuild it."""
    if plan.format == "safetensors":
        return _materialize_safetensors(plan.structure, storages)

    def persistent_load(saved_id: Any) -> Any:
        _, storage_type, key, _location, _numel = saved_id
        return torch.storage.TypedStorage(
            wrap_storage=storages[int(key)], dtype=storage_dtype(storage_type), _internal=True
        )

    unpickler = pickle.Unpickler(io.BytesIO(plan.structure))
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()


def _materialize_safetensors(structure: bytes, storages: Sequence[torch.UntypedStorage]) -> dict[str, torch.Tensor]:
    from safetensors.torch import _TYPES

    (length,) = struct.unpack("<Q", structure[:8])
    header = json.loads(structure[8 : 8 + length])
    header.pop("__metadata__", None)
    tensors = {}
    for (name, entry), storage in zip(header.items(), storages):
        dtype = _TYPES[entry["dtype"]]
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, 0, entry["shape"])  # type: ignore[call-overload]
    return tensors


def tensor_versions(state_dict: Any) -> tuple | None:
    """Every tensor's storage, place and version counter, in order; equal results mean no tensor
    was replaced or changed in place by a PyTorch operation since (writes through `.data` and
    some fused optimizer kernels do not count versions). None when the state dict holds objects
    other than containers, plain values and tensors."""
    found: list[tuple] = []
    stack = [state_dict]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            found.append((storage.data_ptr(), storage.nbytes(), obj.storage_offset(), obj._version, obj.device))
        elif isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))
        elif isinstance(obj, (list, tuple)):
            stack.extend(reversed(obj))
        elif not isinstance(obj, (str, int, float, bool, bytes, type(None), torch.dtype, torch.device)):
            return None
    return tuple(found)
