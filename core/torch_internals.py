"""Every private PyTorch name async-ckpt relies on, reached from here only.

torch.save's zip format, its weights-only unpickler, the rebuild calls its pickles hold and the
way torch.multiprocessing shares storages are public behaviour that PyTorch reaches through
private names. Each is looked up when this module is imported: a PyTorch release that moved one
makes `import core` raise InternalsMovedError naming it, instead of writing or reading files
through a name that is not there. tests/test_internals.py checks every name's behaviour.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from .internals import lookup

TESTED_TORCH = "2.13"
T = TypeVar("T")


def _torch(dotted: str) -> Any:
    return lookup(dotted, "torch", torch.__version__, TESTED_TORCH)


NAMES = (
    "torch._C.PyTorchFileReader",
    "torch._C.PyTorchFileReader.get_record_offset",
    "torch._C.PyTorchFileWriter",
    "torch._C.PyTorchFileWriter.write_record_metadata",
    "torch._weights_only_unpickler.Unpickler",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch._utils._get_obj_state",
    "torch._utils.get_tensor_metadata",
    "torch._utils._element_size",
    "torch.storage._dtype_to_storage_type_map",
    "torch.storage._new_dtypes",
    "torch.UntypedStorage._share_fd_cpu_",
    "torch.UntypedStorage._new_shared",
    "torch.UntypedStorage._new_shared_fd_cpu",
    "torch._foreach_copy_",
    "torch._C._set_grad_enabled",
)
# Those of sharded checkpoints, looked up on first use: importing torch.distributed.tensor costs
# about 0.7 s of CPU, which neither the trainer's `import core` nor the writer's start should pay
# when no DTensor is saved.
DISTRIBUTED_NAMES = (
    "torch.distributed.checkpoint._nested_dict.flatten_state_dict",
    "torch.distributed.checkpoint._nested_dict.unflatten_state_dict",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.distributed.tensor.DTensor.__create_chunk_list__",
    "torch.distributed.tensor.placement_types._StridedShard",
)
# Looked up on the objects that have them: TypedStorage(..., _internal=True), storage._cdata,
# tensor._version (checked by their tests).

FileReader: Any = _torch("torch._C.PyTorchFileReader")
FileWriter: Any = _torch("torch._C.PyTorchFileWriter")
WeightsOnlyUnpickler: Any = _torch("torch._weights_only_unpickler.Unpickler")
rebuild_tensor_v2: Any = _torch("torch._utils._rebuild_tensor_v2")
rebuild_tensor_v3: Any = _torch("torch._utils._rebuild_tensor_v3")
rebuild_parameter: Any = _torch("torch._utils._rebuild_parameter")
rebuild_parameter_with_state: Any = _torch("torch._utils._rebuild_parameter_with_state")
rebuild_from_type_v2: Any = _torch("torch._tensor._rebuild_from_type_v2")
_get_obj_state: Any = _torch("torch._utils._get_obj_state")
_get_tensor_metadata: Any = _torch("torch._utils.get_tensor_metadata")
_element_size: Any = _torch("torch._utils._element_size")
_dtype_to_storage_type_map: Any = _torch("torch.storage._dtype_to_storage_type_map")
_new_dtypes: Any = _torch("torch.storage._new_dtypes")
_foreach_copy: Any = _torch("torch._foreach_copy_")
_set_grad_enabled: Any = _torch("torch._C._set_grad_enabled")
for _name in NAMES:
    _torch(_name)  # the methods too: fail at import, not in the middle of a save


def record_offset(reader: Any, name: str) -> int:
    """Where record `name`'s bytes start in the file a FileReader reads."""
    return int(reader.get_record_offset(name))


def reserve_record(writer: Any, name: str, nbytes: int) -> None:
    """Make room for record `name` of `nbytes` without writing its bytes (torch.save's skip_data)."""
    writer.write_record_metadata(name, nbytes)


def object_state(obj: Any) -> Any:
    """The Python attributes torch.save keeps with a tensor or parameter (None when it has none)."""
    return _get_obj_state(obj)


def tensor_metadata(tensor: torch.Tensor) -> dict[str, Any]:
    """What torch.save records of a tensor beyond its data (the conjugate and negative bits)."""
    return dict(_get_tensor_metadata(tensor))


def element_size(dtype: torch.dtype) -> int:
    return int(_element_size(dtype))


def storage_type_names() -> dict[torch.dtype, str]:
    """The legacy storage class name torch.save records for each dtype that has one."""
    return dict(_dtype_to_storage_type_map())


def untyped_storage_dtypes() -> set[torch.dtype]:
    """The dtypes torch.save records with UntypedStorage (those newer than the legacy classes)."""
    return set(_new_dtypes())


def typed_storage(storage: torch.UntypedStorage, dtype: torch.dtype) -> torch.storage.TypedStorage:
    """The TypedStorage a pickle's storage reference rebuilds to, without the deprecation warning."""
    return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def storage_key(storage: torch.UntypedStorage) -> int:
    """The identity of the memory a storage object refers to (equal for every view of it)."""
    return int(storage._cdata)


def version_counter(tensor: torch.Tensor) -> int:
    """How many in-place changes PyTorch has counted on the tensor's data."""
    return int(tensor._version)


def share_fd(storage: torch.UntypedStorage) -> int:
    """The descriptor of a CPU storage moved to shared memory, as torch.multiprocessing passes it."""
    return int(storage._share_fd_cpu_()[0])


def new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    storage: torch.UntypedStorage = torch.UntypedStorage._new_shared(nbytes)
    return storage


def storage_from_shared_fd(fd: int, nbytes: int) -> torch.UntypedStorage:
    """The storage another process shared with `share_fd`."""
    storage: torch.UntypedStorage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # type: ignore[attr-defined]
    return storage


def copy_many(destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """destination.copy_(source) for each pair, in one call."""
    _foreach_copy(list(destinations), list(sources))


def copy_each(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """destination.copy_(source) for each (destination, source), with autograd off (without_grad)."""

    def copy() -> None:
        for destination, source in pairs:
            destination.copy_(source)

    without_grad(copy)


def without_grad(work: Callable[[], T]) -> T:
    """work(), with autograd off.

    Not `with torch.no_grad()`: its __enter__ is Python, and a Ctrl-C raised right after it has
    turned autograd off leaves it off for the rest of the process. Here the C call that turns it
    off runs inside the try, and the one that turns it back on first in the finally."""
    enabled = torch.is_grad_enabled()
    try:
        _set_grad_enabled(False)
        return work()
    finally:
        _set_grad_enabled(enabled)


@functools.cache
def _distributed() -> dict[str, Any]:
    """DISTRIBUTED_NAMES, each looked up (and torch.distributed.tensor imported) on the first call."""
    return {name.rsplit(".", 1)[1]: _torch(name) for name in DISTRIBUTED_NAMES}


def flatten_state_dict(state_dict: Any) -> tuple[dict[str, Any], Any]:
    """DCP's own naming of the leaves of a nested state dict ("optim.state.0.weight.exp_avg"), and
    the mapping that puts them back: a sharded checkpoint must use exactly these to be DCP's."""
    flat, mapping = _distributed()["flatten_state_dict"](state_dict)
    return flat, mapping


def unflatten_state_dict(flat: dict[str, Any], mapping: Any) -> dict[str, Any]:
    nested: dict[str, Any] = _distributed()["unflatten_state_dict"](flat, mapping)
    return nested


def dcp_storage_info(relative_path: str, offset: int, length: int) -> Any:
    """Where DCP's metadata says a chunk's bytes are (its private _StorageInfo)."""
    return _distributed()["_StorageInfo"](relative_path, offset, length)


def is_strided_shard(placement: Any) -> bool:
    """Whether a DTensor placement is the strided shard FSDP uses over tensor parallelism."""
    return isinstance(placement, _distributed()["_StridedShard"])


def local_chunk(dtensor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offsets, sizes) of the part of a DTensor this rank holds, as DCP computes it."""
    (chunk,) = dtensor.__create_chunk_list__()
    return tuple(chunk.offsets), tuple(chunk.sizes)


def cuda_host_register(pointer: int, nbytes: int) -> int:
    """Pin host memory for fast CUDA copies (cudaHostRegister); returns CUDA's status, 0 on success."""
    return int(torch.cuda.cudart().cudaHostRegister(pointer, nbytes, 0))


def cuda_host_unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)
