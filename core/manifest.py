"""The manifest: the record inside every checkpoint file that lets a reader verify it.

`async_ckpt_manifest.json` (which `torch.load` ignores) holds the format version, the size and
xxh3-64 checksums (one per chunk) of every storage and of the pickle, the writing rank and the
save's write id and metadata. Its length is fixed before the data is written (digests start as
placeholders of the final width), so it is filled in place afterwards.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import torch
import xxhash

from .fsutil import buffer_of

FORMAT_NAME = "async-ckpt"
FORMAT_VERSION = 1
MANIFEST_RECORD = "async_ckpt_manifest.json"
CHECKSUM = "xxh3_64"
_DIGEST_PLACEHOLDER = "0" * 16


def digest(data: memoryview | bytes) -> str:
    return format(xxhash.xxh3_64_intdigest(data), "016x")


def chunk_ranges(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, size) of each chunk of a storage of `nbytes` bytes."""
    return [(start, min(chunk_bytes, nbytes - start)) for start in range(0, nbytes, chunk_bytes)]


def chunk_digests(
    tensors: Sequence[torch.Tensor | memoryview], chunk_bytes: int, executor: Executor | None = None
) -> list[list[str]]:
    """The manifest's digests of CPU uint8 tensors (or their bytes), one list per tensor with one
    digest per chunk; every chunk hashed in parallel on `executor` (xxh3 releases the GIL)."""
    parts, owners = [], []
    for index, data in enumerate(tensors):
        view = data if isinstance(data, memoryview) else buffer_of(data)
        for start, size in chunk_ranges(len(view), chunk_bytes):
            parts.append(view[start : start + size])
            owners.append(index)
    digests: list[list[str]] = [[] for _ in tensors]
    for owner, value in zip(owners, executor.map(digest, parts) if executor else map(digest, parts)):
        digests[owner].append(value)
    return digests


class Manifest:
    """A manifest being filled: built with placeholder digests, completed chunk by chunk."""

    def __init__(
        self, data_pkl: bytes, storage_sizes: Sequence[int], chunk_bytes: int, checksums: bool, extra: dict[str, Any]
    ) -> None:
        self.checksums = checksums
        self.chunk_bytes = chunk_bytes
        self.content: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "checksum": CHECKSUM if checksums else None,
            "chunk_bytes": chunk_bytes,
            "data.pkl": {"nbytes": len(data_pkl), "digest": digest(data_pkl)},
            "storages": {
                str(index): {
                    "nbytes": nbytes,
                    "digests": [_DIGEST_PLACEHOLDER] * len(chunk_ranges(nbytes, chunk_bytes)) if checksums else [],
                }
                for index, nbytes in enumerate(storage_sizes)
            },
            **extra,
        }

    def set_digest(self, key: str, chunk: int, value: str | None) -> None:
        if self.checksums and value is not None:
            self.content["storages"][key]["digests"][chunk] = value

    def encode(self) -> bytes:
        return json.dumps(self.content).encode()

    @functools.cached_property
    def placeholder(self) -> bytes:
        """The manifest before its digests are known: as long as the filled one."""
        return self.encode()

    def final(self) -> bytes:
        """The filled manifest, exactly as long as its placeholder (if one was laid out)."""
        encoded = self.encode()
        if "placeholder" in vars(self) and len(encoded) != len(self.placeholder):
            raise AssertionError("the manifest changed length while its digests were filled in")
        return encoded
