"""Reading checkpoint files: an open zip checkpoint, validated on open, verified as it is read.

A `CheckpointFile` opens its file once and reads everything through that one descriptor, so a
writer that replaces the file meanwhile (an overwrite of `last.ckpt`) cannot mix two saves into
one load. Opening it validates the zip directory, refuses compressed records (torch.save
stores every record), and checks the manifest: its own CRC-32, its checksum algorithm, and that
it describes exactly the storage records the file holds. Any damage is a CheckpointError.
"""

from __future__ import annotations

import json
import os
import re
import threading
import zipfile
import zlib
from typing import IO, Any

from . import torch_internals
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointError,
    UnsupportedFormatVersionError,
)
from .manifest import CHECKSUM, FORMAT_NAME, FORMAT_VERSION, MANIFEST_RECORD, chunk_ranges, digest

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's format before 1.6 (`_use_new_zipfile_serialization=False`): a pickled magic number first.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
_STORAGE_RECORD = re.compile(r"data/(\d+)")
_DIGEST = re.compile(r"[0-9a-f]{16}")
# Far beyond any real object structure (a 100k-tensor state dict pickles to ~20 MB); a record
# claiming more is damage or a decompression bomb, refused before it is read.
_MAX_STRUCTURE_BYTES = 1 << 30
_MAX_MANIFEST_BYTES = 1 << 30


def is_legacy_torch_file(path: str) -> bool:
    """Whether `path` is a torch.save file in the legacy (non-zip) format."""
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


class CheckpointFile:
    """An open zip checkpoint file: validated on open, verified record by record as it is read.

    Raises CheckpointNotFoundError (missing), NotACheckpointError (not a torch checkpoint),
    CorruptCheckpointError (a checkpoint, damaged) or UnsupportedFormatVersionError, and
    nothing else for any content of the file. Close it (or use it as a context manager).
    A torch.save file of the legacy (pre-1.6) format is NotACheckpointError unless `legacy_ok`:
    then `legacy` is True and the caller reads it with torch.load through `fd`.
    """

    def __init__(self, path: str, *, legacy_ok: bool = False) -> None:
        self.path = path
        self._legacy_ok = legacy_ok
        # torch's reader holds a mutex of its own while it reads through the (Python) file object,
        # which needs the GIL: calls into it from several threads go one at a time, through a
        # lock that releases the GIL while it waits.
        self._lock = threading.Lock()
        self._offsets: dict[str, int] = {}
        try:
            self._file: IO[bytes] = open(path, "rb")  # noqa: SIM115 - held for the object's life
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"Checkpoint file not found: {path}") from None
        except IsADirectoryError:
            raise NotACheckpointError(f"{path!r} is a directory, not a checkpoint file") from None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        head = os.pread(self.fd, len(_LEGACY_MAGIC), 0)
        self.legacy = head == _LEGACY_MAGIC and self._legacy_ok
        self.records: set[str] = set()
        self.manifest: dict[str, Any] | None = None
        if self.legacy:
            return
        if head[:4] != _ZIP_MAGIC:
            raise NotACheckpointError(
                f"{self.path!r} is not a PyTorch checkpoint: it does not start with the zip signature "
                "torch.save writes (nor the legacy torch.save header)"
            )
        self._infos = self._zip_directory()
        try:
            self._file.seek(0)  # torch's reader reads the archive from the file's position
            self._zip = torch_internals.FileReader(self._file)
            self.records = set(self._zip.get_all_records())
        except Exception as exc:  # any damage the C++ reader trips on
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r} is truncated or damaged: its zip directory cannot be read ({exc}). "
                "Use an earlier checkpoint"
            ) from None
        if "data.pkl" not in self.records or "data.pkl" not in self._infos:
            raise CorruptCheckpointError(f"checkpoint {self.path!r} is damaged: it has no object structure (data.pkl)")
        self.manifest = self._read_manifest()

    def _zip_directory(self) -> dict[str, zipfile.ZipInfo]:
        """Every record's zip entry by record name (the archive folder stripped), checked for what
        torch.save never writes: compressed records, or one record name twice."""
        try:
            with zipfile.ZipFile(self._file) as archive:
                infos = archive.infolist()
        except Exception as exc:  # BadZipFile, bad names, impossible sizes...
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r} is truncated or damaged: its zip directory cannot be read ({exc}). "
                "Use an earlier checkpoint"
            ) from None
        by_record = {info.filename.split("/", 1)[-1]: info for info in infos}
        if not any(name in by_record for name in ("data.pkl", MANIFEST_RECORD)):
            raise NotACheckpointError(f"{self.path!r} is a zip file but not a PyTorch checkpoint (no data.pkl)")
        if len(by_record) != len(infos):
            raise CorruptCheckpointError(f"checkpoint {self.path!r} is damaged: a record name appears twice")
        compressed = sorted(name for name, info in by_record.items() if info.compress_type != zipfile.ZIP_STORED)
        if compressed:
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r} is damaged or not torch.save's: records {compressed[:5]} are compressed"
            )
        return by_record

    @property
    def fd(self) -> int:
        """The descriptor every read of this file goes through."""
        return self._file.fileno()

    def close(self) -> None:
        self.__dict__.pop("_zip", None)
        self._file.close()

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _damaged(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint {self.path!r} is damaged: {what}. Use an earlier checkpoint")

    def _record(self, name: str, limit: int) -> bytes:
        """A small record's bytes, checked against its zip CRC-32 where the file recorded one."""
        info = self._infos.get(name)
        if info is None or name not in self.records:
            raise self._damaged(f"record {name} is missing")
        if info.file_size > limit:
            raise self._damaged(f"record {name} claims {info.file_size} bytes")
        try:
            with self._lock:
                data = bytes(self._zip.get_record(name))
        except Exception as exc:
            raise self._damaged(f"record {name} cannot be read ({exc})") from None
        if len(data) != info.file_size:
            raise self._damaged(f"record {name} is cut short")
        if info.CRC and zlib.crc32(data) != info.CRC:
            raise self._damaged(f"record {name} fails its CRC-32")
        return data

    def _read_manifest(self) -> dict[str, Any] | None:
        if MANIFEST_RECORD not in self._infos:
            near = [name for name in self._infos if _one_or_two_bytes_apart(name, MANIFEST_RECORD)]
            if near:
                raise self._damaged(f"its manifest's name is damaged ({near[0]!r})")
            return None
        raw = self._record(MANIFEST_RECORD, _MAX_MANIFEST_BYTES)
        try:
            manifest = json.loads(raw)
            if not isinstance(manifest, dict):
                raise ValueError(f"it is a JSON {type(manifest).__name__}, not an object")
            version = manifest.get("version")
            if manifest.get("format") != FORMAT_NAME or isinstance(version, bool) or not isinstance(version, int):
                raise ValueError(f"it names format {manifest.get('format')!r} version {version!r}")
        except (ValueError, RecursionError) as exc:
            raise self._damaged(f"its manifest is unreadable ({exc})") from None
        if version > FORMAT_VERSION:
            raise UnsupportedFormatVersionError(
                f"checkpoint {self.path!r} has format version {version}, newer than the "
                f"{FORMAT_VERSION} this async-ckpt reads; upgrade async-ckpt to load it"
            )
        problem = self._manifest_problem(manifest)
        if problem is not None:
            raise self._damaged(f"its manifest {problem}")
        return manifest

    def _manifest_problem(self, manifest: dict[str, Any]) -> str | None:
        """What is wrong with a manifest's content, or None: every field the reader relies on is
        checked here, so that later reads cannot meet a missing key or a value of the wrong type."""
        checksum = manifest.get("checksum")
        if checksum not in (None, CHECKSUM):
            return f"names checksum algorithm {checksum!r}, which this async-ckpt does not know"
        chunk_bytes = manifest.get("chunk_bytes")
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes <= 0:
            return f"has chunk_bytes {chunk_bytes!r}"
        structure = manifest.get("data.pkl")
        if (
            not isinstance(structure, dict)
            or not _is_count(structure.get("nbytes"))
            or not _is_digest(structure.get("digest"))
        ):
            return "does not describe data.pkl"
        storages = manifest.get("storages")
        if not isinstance(storages, dict):
            return "lists no storages"
        in_file = {m.group(1) for name in self._infos if (m := _STORAGE_RECORD.fullmatch(name))}
        if set(storages) != in_file:
            return f"lists storages {sorted(storages)[:5]}, the file holds {sorted(in_file)[:5]}"
        for key, storage in storages.items():
            if not isinstance(storage, dict) or storage.get("nbytes") != self._infos[f"data/{key}"].file_size:
                return f"gives storage data/{key} a size other than its record's"
            digests = storage.get("digests")
            count = len(chunk_ranges(storage["nbytes"], chunk_bytes)) if checksum else 0
            if not isinstance(digests, list) or len(digests) != count or not all(map(_is_digest, digests)):
                return f"has no valid checksums for data/{key}"
        if not all(isinstance(manifest.get(k, ""), str) for k in ("write_id",)) or not isinstance(
            manifest.get("metadata", {}), dict
        ):
            return "has a write id or metadata of the wrong type"
        return None

    @property
    def write_id(self) -> str | None:
        """The id of the save that wrote this file (None: not written by async-ckpt)."""
        return None if self.manifest is None else self.manifest.get("write_id")

    @property
    def series(self) -> str | None:
        """The retention series that wrote this file (None: none; see retention.py)."""
        series = None if self.manifest is None else self.manifest.get("series")
        return series if isinstance(series, str) else None

    @property
    def verifiable(self) -> bool:
        """Whether the file carries checksums this reader can check."""
        return self.manifest is not None and self.manifest.get("checksum") == CHECKSUM

    def record_nbytes(self, key: str) -> int | None:
        """The size of storage record `data/<key>` in the zip directory (None: no such record)."""
        info = self._infos.get(f"data/{key}")
        return None if info is None else info.file_size

    def data_pkl(self, verify: bool = True) -> bytes:
        data = self._record("data.pkl", _MAX_STRUCTURE_BYTES)
        if verify and self.verifiable:
            assert self.manifest is not None
            expected = self.manifest["data.pkl"]
            if len(data) != expected["nbytes"] or digest(data) != expected["digest"]:
                raise self._damaged("record data.pkl (the object structure) fails its checksum")
        return data

    def storage_offset(self, key: str) -> int:
        with self._lock:
            if key not in self._offsets:
                try:
                    self._offsets[key] = torch_internals.record_offset(self._zip, f"data/{key}")
                except Exception as exc:
                    raise self._damaged(f"storage data/{key} cannot be found ({exc})") from None
            return self._offsets[key]

    def _digests(self, key: str) -> list[str]:
        assert self.manifest is not None
        return list(self.manifest["storages"][key]["digests"])

    def read_storage(self, key: str, dest: memoryview, verify: bool = True) -> bool:
        """Fill `dest` with storage `key`; False when verified bytes fail their checksum."""
        offset = self.storage_offset(key)
        chunk_bytes = self.manifest["chunk_bytes"] if self.manifest else len(dest) or 1
        digests = self._digests(key) if (verify and self.verifiable) else None
        for n, (start, size) in enumerate(chunk_ranges(len(dest), chunk_bytes)):
            part = dest[start : start + size]
            got = os.preadv(self.fd, [part], offset + start)
            if got != size:
                raise self._damaged(f"storage data/{key} ends after {start + got} bytes (the file is truncated)")
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
        for key, storage in storages.items():
            try:
                offset = self.storage_offset(key)
            except CheckpointError:
                damaged.append(f"data/{key}")
                continue
            digests = self._digests(key)
            for n, (start, size) in enumerate(chunk_ranges(storage["nbytes"], chunk_bytes)):
                part = memoryview(buffer)[:size]
                if os.preadv(self.fd, [part], offset + start) != size or digest(part) != digests[n]:
                    damaged.append(f"data/{key}")
                    break
        return damaged


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def _one_or_two_bytes_apart(name: str, expected: str) -> bool:
    """Whether `name` is `expected` with one or two characters changed (a flipped byte in a name)."""
    return len(name) == len(expected) and 0 < sum(a != b for a, b in zip(name, expected)) <= 2
