"""The commit record: the file whose presence makes a directory checkpoint complete.

Every rank writes its own file into the checkpoint directory; once every rank's file is
durable and in place, rank 0 (and, without a shared filesystem, the first rank of each node)
writes `commit.json` last, atomically. It lists each rank's file with its size and the write
id embedded in that file's manifest, so a directory whose files come from different saves
(an overwrite that did not finish) is told apart from a committed one.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CorruptCheckpointError, UncommittedCheckpointError
from .fsutil import fsync_directory

COMMIT_RECORD = "commit.json"
COMMIT_FORMAT = "async-ckpt-commit"
COMMIT_VERSION = 2  # 2: sharded checkpoints (an index); records without one are still written as 1
_MAX_RECORD_BYTES = 64 << 20  # far beyond any job's record (about 150 bytes a rank)


@dataclass(frozen=True)
class RankFile:
    """One rank's file of a committed checkpoint."""

    rank: int
    file: str
    nbytes: int
    write_id: str


@dataclass(frozen=True)
class CommitRecord:
    """What commit.json holds: every rank's file, when it was committed, the save's metadata,
    whether every rank's file is on this filesystem (False: per-node local disks), and the
    retention series that may delete it (None: no retention owns it). A sharded checkpoint's
    record also names its index (`index_file`) and that file's digest: the index says where
    every item of every rank's file lies, and the digest ties it to this commit."""

    world_size: int
    files: tuple[RankFile, ...]
    committed_at: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)
    shared_filesystem: bool = True
    series: str | None = None  # the retention series that owns this checkpoint (see retention.py)
    index_file: str | None = None
    index_digest: str | None = None
    extra_files: dict[str, str] = field(default_factory=dict)  # name -> digest (see WriteOptions)

    @property
    def sharded(self) -> bool:
        return self.index_file is not None

    def file_of(self, rank: int) -> RankFile:
        return self.files[rank]

    def to_json(self) -> str:
        record = asdict(self)
        if not self.sharded:
            del record["index_file"], record["index_digest"], record["extra_files"]
        return json.dumps({"format": COMMIT_FORMAT, "version": 2 if self.sharded else 1, **record}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> CommitRecord:
        """Parse and validate a commit record; any damage is a CorruptCheckpointError naming `where`."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError(f"it is a JSON {type(raw).__name__}, not an object")
            if raw.get("format") != COMMIT_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, not {COMMIT_FORMAT!r}")
            version = _integer(raw.get("version"), "version")
            if version > COMMIT_VERSION:
                raise ValueError(f"version {version} is newer than the {COMMIT_VERSION} this async-ckpt reads")
            world_size = _integer(raw["world_size"], "world_size")
            if world_size < 1:
                raise ValueError(f"world_size is {world_size}")
            if not isinstance(raw["files"], list):
                raise ValueError("files is not a list")
            files = tuple(_rank_file(entry) for entry in raw["files"])
            committed_at = raw["committed_at"]
            if isinstance(committed_at, bool) or not isinstance(committed_at, (int, float)):
                raise ValueError(f"committed_at is {committed_at!r}, not a time")
            if not math.isfinite(committed_at):
                raise ValueError(f"committed_at is {committed_at!r}")
            metadata = raw.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise ValueError("metadata is not an object")
            shared = raw.get("shared_filesystem", True)
            series = raw.get("series")
            if not isinstance(shared, bool) or not (series is None or isinstance(series, str)):
                raise ValueError("shared_filesystem or series has the wrong type")
            index_file, index_digest = raw.get("index_file"), raw.get("index_digest")
            if index_file is not None and not (
                isinstance(index_file, str) and is_plain_name(index_file) and isinstance(index_digest, str)
            ):
                raise ValueError(f"index_file {index_file!r} or index_digest {index_digest!r} is not valid")
            extra = raw.get("extra_files") or {}
            if not isinstance(extra, dict) or not all(
                isinstance(name, str) and is_plain_name(name) and isinstance(value, str)
                for name, value in extra.items()
            ):
                raise ValueError(f"extra_files is {extra!r}")
            record = cls(
                world_size, files, float(committed_at), metadata, shared, series, index_file, index_digest, extra
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CorruptCheckpointError(
                f"commit record {where!r} is damaged ({type(exc).__name__}: {exc}); use an earlier checkpoint"
            ) from None
        if [f.rank for f in files] != list(range(record.world_size)):
            raise CorruptCheckpointError(f"commit record {where!r} does not list one file per rank")
        return record


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} is {value!r}, not an integer")
    return value


def _rank_file(entry: Any) -> RankFile:
    """One entry of `files`; its name must be a plain file name inside the checkpoint folder."""
    if not isinstance(entry, dict) or set(entry) != {"rank", "file", "nbytes", "write_id"}:
        raise ValueError(f"a file entry is {entry!r}")
    name = entry["file"]
    if not isinstance(name, str) or not is_plain_name(name):
        raise ValueError(f"file {name!r} is not a file name inside the checkpoint folder")
    if not isinstance(entry["write_id"], str):
        raise ValueError(f"write_id {entry['write_id']!r} is not a string")
    nbytes = _integer(entry["nbytes"], "nbytes")
    if nbytes < 0:
        raise ValueError(f"nbytes is {nbytes}")
    return RankFile(_integer(entry["rank"], "rank"), name, nbytes, entry["write_id"])


def is_plain_name(name: str) -> bool:
    """Whether `name` names an entry directly inside a folder (no separator, no `..`, not absolute)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def new_write_id() -> str:
    return uuid.uuid4().hex


def write_commit_record(directory: str, record: CommitRecord) -> None:
    """Write commit.json into `directory` atomically and durably (temporary file, fsync, rename)."""
    final = os.path.join(directory, COMMIT_RECORD)
    temporary = os.path.join(directory, f".{COMMIT_RECORD}.{new_write_id()[:12]}.tmp")
    try:
        with open(temporary, "w") as out:
            out.write(record.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_directory(directory)


def read_commit_record(directory: str) -> CommitRecord:
    """The commit record of a directory checkpoint; UncommittedCheckpointError when it has none."""
    where = os.path.join(directory, COMMIT_RECORD)
    try:
        with open(where, "rb") as record:
            text = record.read(_MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        present = sorted(os.listdir(directory))[:10]
        raise UncommittedCheckpointError(
            f"checkpoint directory {directory!r} is not committed: it has no {COMMIT_RECORD} (found "
            f"{present or 'nothing'}). Its save was interrupted, failed on some rank, or is still running; "
            "treat it as absent and resume from an earlier checkpoint (core.find_latest finds one)"
        ) from None
    if len(text) > _MAX_RECORD_BYTES:
        raise CorruptCheckpointError(f"commit record {where!r} is damaged: it is over {_MAX_RECORD_BYTES} bytes")
    return CommitRecord.from_json(text, where)
