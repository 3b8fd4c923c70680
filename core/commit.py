"""The commit record: the file whose presence makes a directory checkpoint complete.

Every rank writes its own file into the checkpoint directory; once every rank's file is
durable and in place, rank 0 (and, without a shared filesystem, the first rank of each node)
writes `commit.json` last, atomically. It lists each rank's file with its size and the write
id embedded in that file's manifest, so a directory whose files come from different saves
(an overwrite that did not finish) is told apart from a committed one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CorruptCheckpointError, UncommittedCheckpointError
from .fsutil import fsync_directory

COMMIT_RECORD = "commit.json"
COMMIT_FORMAT = "async-ckpt-commit"
COMMIT_VERSION = 1


@dataclass(frozen=True)
class RankFile:
    """One rank's file of a committed checkpoint."""

    rank: int
    file: str
    nbytes: int
    write_id: str


@dataclass(frozen=True)
class CommitRecord:
    """What commit.json holds: every rank's file, when it was committed, the save's metadata, and
    whether every rank's file is on this filesystem (False: per-node local disks)."""

    world_size: int
    files: tuple[RankFile, ...]
    committed_at: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)
    shared_filesystem: bool = True

    def file_of(self, rank: int) -> RankFile:
        return self.files[rank]

    def to_json(self) -> str:
        record = asdict(self)
        return json.dumps({"format": COMMIT_FORMAT, "version": COMMIT_VERSION, **record}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> CommitRecord:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError(f"it is a JSON {type(raw).__name__}, not an object")
            if raw.get("format") != COMMIT_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, not {COMMIT_FORMAT!r}")
            files = tuple(RankFile(**entry) for entry in raw["files"])
            record = cls(
                int(raw["world_size"]),
                files,
                float(raw["committed_at"]),
                dict(raw.get("metadata") or {}),
                bool(raw.get("shared_filesystem", True)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(
                f"commit record {where!r} is damaged ({exc}); use an earlier checkpoint"
            ) from None
        if [f.rank for f in files] != list(range(record.world_size)):
            raise CorruptCheckpointError(f"commit record {where!r} does not list one file per rank")
        return record


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
        with open(where) as record:
            text = record.read()
    except FileNotFoundError:
        present = sorted(os.listdir(directory))[:10]
        raise UncommittedCheckpointError(
            f"checkpoint directory {directory!r} is not committed: it has no {COMMIT_RECORD} (found "
            f"{present or 'nothing'}). Its save was interrupted, failed on some rank, or is still running; "
            "treat it as absent and resume from an earlier checkpoint (core.find_latest finds one)"
        ) from None
    return CommitRecord.from_json(text, where)
