"""Capture: torch.save's pickle of a state dict, without its tensor bytes.

`capture` pickles the state dict exactly as `torch.save` would (the same `data.pkl`: tensors as
`_rebuild_tensor_v2`/`v3` or `_rebuild_parameter` calls whose storages are persistent
references "0", "1", ...), but without touching tensor bytes, and lists the storages those
references name. Tensors that share a storage (tied weights, views) keep sharing it with their
own sizes, strides and offsets, so the file has exactly the aliasing of the live state. The
writer never unpickles anything, so user classes need not be importable in the writer process.
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import types
from collections import OrderedDict
from typing import Any

import torch

from . import torch_internals
from .errors import UnsupportedStateError
from .plan import CapturedState, exact_tensor, plan_of_sizes
from .sharding import is_dtensor


class _StorageRef:
    """Stands for storage `key` in the pickle; becomes torch's persistent storage id."""

    __slots__ = ("key", "storage_type", "numel")

    def __init__(self, key: str, storage_type: Any, numel: int) -> None:
        self.key, self.storage_type, self.numel = key, storage_type, numel


@functools.cache
def _legacy_storage_type(dtype: torch.dtype) -> Any:
    """The storage class torch.save names for `dtype` (UntypedStorage for newer dtypes)."""
    if dtype in torch_internals.untyped_storage_dtypes():
        return torch.UntypedStorage
    return getattr(torch, torch_internals.storage_type_names()[dtype])


class _HoldsDTensor(UnsupportedStateError):
    """Raised out of the torch pickling when it meets a DTensor: the state is saved sharded."""


def check_tensor(tensor: torch.Tensor) -> None:
    """Refuse, before anything is written, a tensor no checkpoint file can hold."""
    if not (tensor.is_meta or tensor.is_quantized or tensor.layout != torch.strided):
        return
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
        types.FunctionType,  # the rebuild functions in each tensor's reduction
        type,
    }
)


class _CapturePickler(pickle.Pickler):
    """torch.save's pickling, with storages collected instead of serialised."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=2)
        self.storages: list[torch.UntypedStorage] = []
        self.exact: list[torch.Tensor | None] = []  # per storage (see CapturedState)
        self._refs: dict[tuple[torch.device, int], tuple[_StorageRef, torch.dtype]] = {}
        self.dispatch_table = copyreg.dispatch_table.copy()
        self.dispatch_table[torch.Tensor] = self._reduce_tensor
        self.dispatch_table[torch.nn.Parameter] = self._reduce_parameter

    def release(self) -> tuple[list[torch.UntypedStorage], list[torch.Tensor | None]]:
        """The storages collected and their exact tensors; the pickler lets go of them and of
        itself. Its dispatch table holds its own bound methods, a reference cycle that would
        otherwise keep every storage of the state alive until Python's cyclic garbage collector runs."""
        storages, self.storages = self.storages, []
        exact, self.exact = self.exact, []
        self.dispatch_table = {}
        self._refs = {}
        return storages, exact

    def _storage_ref(self, tensor: torch.Tensor) -> _StorageRef:
        storage = tensor.untyped_storage()
        identity = (storage.device, torch_internals.storage_key(storage))
        if identity not in self._refs:
            storage_type = _legacy_storage_type(tensor.dtype)
            numel = (
                storage.nbytes() if storage_type is torch.UntypedStorage else storage.nbytes() // tensor.element_size()
            )
            self._refs[identity] = (_StorageRef(str(len(self.storages)), storage_type, numel), tensor.dtype)
            self.storages.append(storage)
            self.exact.append(exact_tensor(tensor, storage))
        ref, dtype = self._refs[identity]
        if self.exact[int(ref.key)] is None:
            self.exact[int(ref.key)] = exact_tensor(tensor, storage)
        if dtype != tensor.dtype:
            raise UnsupportedStateError(
                f"cannot checkpoint tensors that view the same memory as different dtypes ({dtype} and "
                f"{tensor.dtype}); torch.load cannot restore that sharing. Save a .clone() of one of them"
            )
        return ref

    def _reduce_tensor(self, tensor: torch.Tensor) -> tuple[Any, ...]:
        """torch.save's reduction of a dense tensor (Tensor.__reduce_ex__), storages by reference."""
        check_tensor(tensor)
        ref = self._storage_ref(tensor)
        args: tuple[Any, ...] = (
            ref,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.requires_grad,
            OrderedDict(),
        )
        metadata = torch_internals.tensor_metadata(tensor)  # the conjugate and negative bits
        rebuild: Any = torch_internals.rebuild_tensor_v2
        if ref.storage_type is torch.UntypedStorage:
            rebuild, args = torch_internals.rebuild_tensor_v3, (*args, tensor.dtype)
        if metadata:
            args = (*args, metadata)
        state = torch_internals.object_state(tensor)
        if state:  # Python attributes set on the tensor, which torch.save keeps
            return torch_internals.rebuild_from_type_v2, (rebuild, type(tensor), args, state)
        return rebuild, args

    def _reduce_parameter(self, parameter: torch.nn.Parameter) -> tuple[Any, ...]:
        state = torch_internals.object_state(parameter)
        if state:
            return torch_internals.rebuild_parameter_with_state, (
                parameter.data,
                parameter.requires_grad,
                OrderedDict(),
                state,
            )
        return torch_internals.rebuild_parameter, (parameter.data, parameter.requires_grad, OrderedDict())

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled: the common types leave after one set lookup.
        kind = type(obj)
        if kind in _PLAIN_TYPES:
            return None
        if kind is _StorageRef:
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        if isinstance(obj, torch.Tensor):  # a subclass (plain tensors and parameters left above)
            if is_dtensor(obj):
                raise _HoldsDTensor("a sharded state dict")
            raise UnsupportedStateError(
                f"cannot checkpoint a {type(obj).__name__} of shape {tuple(obj.shape)}: only plain tensors and "
                "nn.Parameter are supported; convert it (e.g. .full_tensor() or .to_local()) first"
            )
        if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
            raise UnsupportedStateError("cannot checkpoint a bare torch storage; save a tensor that views it instead")
        return None


def capture(state_dict: Any, file_format: str = "torch") -> CapturedState:
    """Plan a checkpoint of `state_dict` in `file_format` ("torch" or "safetensors"); a state
    dict holding DTensors is planned as this rank's part of a sharded checkpoint instead."""
    if file_format == "safetensors":
        from .safetensors_format import capture_safetensors  # it builds on check_tensor here

        return capture_safetensors(state_dict)
    if file_format != "torch":
        raise ValueError(f"unknown checkpoint format {file_format!r}; use 'torch' or 'safetensors'")
    try:
        return capture_torch(state_dict)  # (its pickling meets every tensor: no walk of its own to find DTensors)
    except _HoldsDTensor:
        from .sharded_plan import capture_sharded
        from .types import default_rank_info

        return capture_sharded(state_dict, default_rank_info().global_rank)


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
        storages, exact = pickler.release()
    plan = plan_of_sizes(buffer.getvalue(), [storage.nbytes() for storage in storages], "torch")
    return CapturedState(plan, storages=storages, exact=exact)


class _ContiguousTensor:
    """Pickles as torch.save pickles a contiguous tensor of `shape` and `dtype` whose storage "0"
    holds exactly its elements: the data.pkl of one item of a sharded (DCP) checkpoint file."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, shape

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        numel = 1
        for size in self.shape:
            numel *= size
        storage_type = _legacy_storage_type(self.dtype)
        untyped = storage_type is torch.UntypedStorage
        ref = _StorageRef("0", storage_type, numel * torch_internals.element_size(self.dtype) if untyped else numel)
        strides, stride = [], 1
        for size in reversed(self.shape):
            strides.append(stride)
            stride *= max(size, 1)
        args: tuple[Any, ...] = (ref, 0, self.shape, tuple(reversed(strides)), False, OrderedDict())
        if untyped:
            return torch_internals.rebuild_tensor_v3, (*args, self.dtype)
        return torch_internals.rebuild_tensor_v2, args


def tensor_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """torch.save's data.pkl for a contiguous tensor of `shape` and `dtype` (its bytes in record data/0)."""
    buffer = io.BytesIO()
    pickler = _CapturePickler(buffer)
    try:
        pickler.dump(_ContiguousTensor(dtype, tuple(shape)))
    finally:
        pickler.release()
    return buffer.getvalue()
