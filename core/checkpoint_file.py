"""Reading checkpoint files: an open zip checkpoint, validated on open, verified as it is read."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import torch

from .errors import CheckpointNotFoundError, CorruptCheckpointError, NotACheckpointError, UnsupportedFormatVersionError
from .fsutil import DEFAULT_CHUNK_BYTES, buffer_of
from .manifest import CHECKSUM, FORMAT_NAME, FORMAT_VERSION, MANIFEST_RECORD, chunk_ranges, digest

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's format before 1.6 (`_use_new_zipfile_serialization=False`): a pickled magic number first.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def is_legacy_torch_file(path: str) -> bool:
    """Whether `path` is a torch.save file in the legacy (non-zip) format."""
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


class CheckpointFile:
    """An open zip checkpoint file: validated on open, verified record by record as it is read."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.exists(path):
            raise CheckpointNotFoundError(f"Checkpoint file not found: {path}")
        if os.path.isdir(path):
            raise NotACheckpointError(f"{path!r} is a directory, not a checkpoint file")
        with open(path, "rb") as f:
            head = f.read(4)
        if head != _ZIP_MAGIC:
            raise NotACheckpointError(
                f"{path!r} is not a PyTorch checkpoint: it does not start with the zip signature "
                "torch.save writes (nor the legacy torch.save header)"
            )
        try:
            self._zip = torch._C.PyTorchFileReader(path)
            with zipfile.ZipFile(path) as archive:
                self._sizes = {info.filename.split("/", 1)[-1]: info.file_size for info in archive.infolist()}
        except (RuntimeError, zipfile.BadZipFile, OSError) as exc:
            if zipfile.is_zipfile(path) and not isinstance(exc, zipfile.BadZipFile):
                raise NotACheckpointError(f"{path!r} is a zip file but not a PyTorch checkpoint ({exc})") from None
            raise CorruptCheckpointError(
                f"checkpoint {path!r} is truncated or damaged: its zip directory cannot be read ({exc}). "
                "Use an earlier checkpoint"
            ) from None
        self.records = set(self._zip.get_all_records())
        if "data.pkl" not in self.records:
            raise NotACheckpointError(f"{path!r} is a zip file but not a PyTorch checkpoint (no data.pkl)")
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any] | None:
        if MANIFEST_RECORD not in self.records:
            return None
        try:
            manifest = json.loads(bytes(self._zip.get_record(MANIFEST_RECORD)))
            if not isinstance(manifest, dict):
                raise ValueError(f"it is a JSON {type(manifest).__name__}, not an object")
            version = int(manifest.get("version", 0))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CorruptCheckpointError(f"checkpoint {self.path!r}: its manifest is unreadable ({exc})") from None
        if manifest.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}: its manifest names format {manifest.get('format')!r}"
            )
        if version > FORMAT_VERSION:
            raise UnsupportedFormatVersionError(
                f"checkpoint {self.path!r} has format version {version}, newer than the "
                f"{FORMAT_VERSION} this async-ckpt reads; upgrade async-ckpt to load it"
            )
        if manifest.get("checksum") == CHECKSUM and not isinstance(manifest.get("storages"), dict):
            raise CorruptCheckpointError(f"checkpoint {self.path!r}: its manifest lists no storages")
        return manifest

    @property
    def write_id(self) -> str | None:
        """The id of the save that wrote this file (None: not written by async-ckpt)."""
        return None if self.manifest is None else self.manifest.get("write_id")

    @property
    def verifiable(self) -> bool:
        """Whether the file carries checksums this reader can check."""
        return self.manifest is not None and self.manifest.get("checksum") == CHECKSUM

    def record_nbytes(self, key: str) -> int | None:
        """The size of storage record `data/<key>` in the zip directory (None: no such record)."""
        return self._sizes.get(f"data/{key}")

    def data_pkl(self, verify: bool = True) -> bytes:
        data = bytes(self._zip.get_record("data.pkl"))
        if verify and self.verifiable:
            assert self.manifest is not None
            expected = self.manifest["data.pkl"]
            if len(data) != expected["nbytes"] or digest(data) != expected["digest"]:
                raise CorruptCheckpointError(
                    f"checkpoint {self.path!r} is damaged: record data.pkl (the object structure) fails its checksum"
                )
        return data

    def storage_offset(self, key: str) -> int:
        return self._zip.get_record_offset(f"data/{key}")  # type: ignore[attr-defined]

    def _digests(self, key: str) -> list[str]:
        assert self.manifest is not None
        try:
            return list(self.manifest["storages"][key]["digests"])
        except (KeyError, TypeError):
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}: its manifest has no checksums for data/{key}"
            ) from None

    def read_storage(self, fd: int, key: str, dest: torch.Tensor, verify: bool = True) -> bool:
        """Fill `dest` (CPU uint8) with storage `key`; False when verified bytes fail their checksum."""
        offset = self.storage_offset(key)
        view = buffer_of(dest)
        chunk_bytes = self.manifest["chunk_bytes"] if self.manifest else DEFAULT_CHUNK_BYTES
        digests = self._digests(key) if (verify and self.verifiable) else None
        for n, (start, size) in enumerate(chunk_ranges(len(view), chunk_bytes)):
            part = view[start : start + size]
            got = os.preadv(fd, [part], offset + start)
            if got != size:
                raise CorruptCheckpointError(
                    f"checkpoint {self.path!r} is truncated: storage data/{key} ends after {start + got} bytes"
                )
            if digests is not None and (n >= len(digests) or digest(part) != digests[n]):
                return False
        return True

    def damaged_records(self) -> list[str]:
        """Every record whose bytes fail their checksum (or are cut short), reading the whole file once.

        Files without checksums only have their structure checked.
        """
        damaged = []
        try:
            self.data_pkl(verify=True)
        except CorruptCheckpointError:
            damaged.append("data.pkl")
        if not self.verifiable:
            return damaged
        assert self.manifest is not None
        storages = self.manifest["storages"]
        chunk_bytes = self.manifest["chunk_bytes"]
        buffer = bytearray(min(chunk_bytes, max((s["nbytes"] for s in storages.values()), default=0)))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for key, storage in storages.items():
                offset = self.storage_offset(key)
                digests = self._digests(key)
                for n, (start, size) in enumerate(chunk_ranges(storage["nbytes"], chunk_bytes)):
                    part = memoryview(buffer)[:size]
                    if os.preadv(fd, [part], offset + start) != size or n >= len(digests) or digest(part) != digests[n]:
                        damaged.append(f"data/{key}")
                        break
        finally:
            os.close(fd)
        return damaged
