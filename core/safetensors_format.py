"""The safetensors file format: planning a file of a flat dict of tensors, and rebuilding one.

Accelerate writes model weights as `model.safetensors`; the writer writes the plan's header and
then the tensors back to back, from the staging memory, as it writes torch.save files.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import torch

from .capture import check_tensor
from .errors import UnsupportedStateError
from .fsutil import round_up
from .plan import CapturedState, bytes_of, planned
from .safetensors_internals import dtype_codes
from .sharding import is_dtensor

SAFETENSORS_METADATA = {"format": "pt"}  # what safetensors.torch and Accelerate write, and their loaders expect


def capture_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> CapturedState:
    """Plan a safetensors file of the flat dict `tensors` (names to tensors, no shared storage).

    Non-contiguous tensors are made contiguous here, on the calling thread, as
    safetensors.torch.save_file does. The header is padded so that the data starts on a page.
    """
    codes = {dtype: code for code, dtype in dtype_codes().items()}
    header: dict[str, Any] = {"__metadata__": SAFETENSORS_METADATA if metadata is None else metadata}
    sources: list[torch.Tensor] = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedStateError(f"safetensors holds only tensors; {name!r} is a {type(tensor).__name__}")
        if is_dtensor(tensor):
            raise UnsupportedStateError(
                f"cannot save {name!r}, a DTensor, as safetensors: a state dict holding DTensors is saved as a "
                "sharded (DCP) checkpoint directory. Leave file_format at its default"
            )
        check_tensor(tensor)
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
        sources.append(bytes_of(tensor.untyped_storage(), start, nbytes))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = round_up(8 + len(text)) - 8
    structure = struct.pack("<Q", padded) + text + b" " * (padded - len(text))
    return planned(structure, sources, "safetensors")


def materialize_safetensors(structure: bytes, storages: Sequence[torch.UntypedStorage]) -> dict[str, torch.Tensor]:
    """The flat dict of tensors a safetensors plan describes, built on `storages` (not copied)."""
    codes = dtype_codes()

    (length,) = struct.unpack("<Q", structure[:8])
    header = json.loads(structure[8 : 8 + length])
    header.pop("__metadata__", None)
    tensors = {}
    for (name, entry), storage in zip(header.items(), storages):
        dtype = codes[entry["dtype"]]
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, 0, entry["shape"])  # type: ignore[call-overload]
    return tensors
