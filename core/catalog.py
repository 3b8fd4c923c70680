"""What a directory of checkpoints holds: which are complete, which is newest, which are in use.

A checkpoint is a directory with a commit record (the core's layouts, per-rank files or
sharded), a directory stock DCP wrote, or a single checkpoint file (the adapters', and plain
torch.save files). `find_latest` picks the newest complete one
for a resume, skipping incomplete and damaged ones with a logged reason. Readers hold a shared
lock on a checkpoint while they read it; retention only deletes what it can lock exclusively.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .checkpoint_file import CheckpointFile
from .commit import COMMIT_RECORD, read_commit_record
from .dcp_format import INDEX_PREFIX, METADATA_FILE
from .errors import CheckpointError, NotACheckpointError
from .leftovers import TEMPORARY_PREFIX, Leftover
from .leftovers import find as find_leftovers
from .sharded_load import open_sharded
from .unpickle import structure_problem

logger = logging.getLogger(__name__)

LATEST = "latest"
_STEP_IN_NAME = re.compile(r"step[=_-]?(\d+)", re.IGNORECASE)
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class CheckpointInfo:
    """One checkpoint as `ls` shows it; `reason` says why it is not complete."""

    path: str
    kind: str  # "directory" or "file"
    complete: bool
    reason: str | None
    nbytes: int
    committed_at: float | None
    step: int | None = None
    world_size: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    series: str | None = None  # the retention series that may delete it (None: none may)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def step_from_name(name: str) -> int | None:
    """The training step a checkpoint's name carries: `step=120`, `step_000120`, or its last number."""
    match = _STEP_IN_NAME.search(name) or _LAST_NUMBER.search(name)
    return int(match.group(1)) if match else None


def describe_checkpoint(path: str, deep: bool = False) -> CheckpointInfo:
    """Whether the checkpoint at `path` is complete; `deep` also reads every byte against its checksums.

    Raises NotACheckpointError for a file that is not a checkpoint at all.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _describe_directory(path, deep)
    return _describe_file(path, deep)


def _describe_directory(path: str, deep: bool) -> CheckpointInfo:
    sizes = {
        name: os.path.getsize(os.path.join(path, name))
        for name in os.listdir(path)
        if os.path.isfile(os.path.join(path, name)) and not name.startswith(".")
    }
    leftovers = find_leftovers(path)
    info = CheckpointInfo(
        path,
        "directory",
        False,
        None,
        sum(sizes.values()) + sum(leftover.nbytes for leftover in leftovers),
        None,
        step_from_name(os.path.basename(path)),
    )
    committed = os.path.exists(os.path.join(path, COMMIT_RECORD))
    if not committed and not _written_by_dcp(path):
        info.reason = f"not committed (no {COMMIT_RECORD})" + _interrupted(leftovers)
        return info
    try:
        record = read_commit_record(path) if committed else None
        sharded = open_sharded(path)
    except CheckpointError as exc:
        info.reason = str(exc)
        return info
    if record is None:  # stock DCP's: complete once its .metadata is there
        info.committed_at = os.path.getmtime(os.path.join(path, METADATA_FILE))
    else:
        info.committed_at, info.world_size, info.metadata = record.committed_at, record.world_size, record.metadata
        info.series = record.series
    step = info.metadata.get("step")
    info.step = step if isinstance(step, int) and not isinstance(step, bool) else info.step
    if sharded is not None:
        with sharded:
            info.reason = sharded.problem(deep)
        info.complete = info.reason is None
        return info
    assert record is not None
    for entry in record.files:
        if not record.shared_filesystem and not os.path.exists(os.path.join(path, entry.file)):
            continue  # per-node local disks: other nodes hold their ranks' files
        problem = _file_problem(os.path.join(path, entry.file), deep, entry.write_id)
        if problem is not None:
            info.reason = f"rank {entry.rank}: {problem}"
            return info
    info.complete = True
    return info


def _interrupted(leftovers: list[Leftover]) -> str:
    """What a folder's leftovers say about its save: still running, or interrupted."""
    if not leftovers:
        return ""
    nbytes = sum(leftover.nbytes for leftover in leftovers)
    if any(leftover.owner_alive for leftover in leftovers):
        return f"; a save is writing it ({nbytes} bytes so far)"
    return f"; an interrupted save left {nbytes} bytes in {', '.join(sorted(x.name for x in leftovers))}"


def _describe_file(path: str, deep: bool) -> CheckpointInfo:
    info = CheckpointInfo(
        path, "file", False, None, os.path.getsize(path), None, step_from_name(os.path.basename(path))
    )
    try:
        ckpt = CheckpointFile(path)
    except NotACheckpointError:
        raise
    except CheckpointError as exc:  # a checkpoint, but damaged
        info.reason = str(exc)
        return info
    with ckpt:
        info.reason = _problem(ckpt, deep, None)
        if info.reason is None:
            info.complete, info.committed_at = True, os.fstat(ckpt.fd).st_mtime
            info.metadata = (ckpt.manifest or {}).get("metadata") or {}
            info.series = ckpt.series
            step = info.metadata.get("step")
            info.step = step if isinstance(step, int) and not isinstance(step, bool) else info.step
    return info


def _file_problem(path: str, deep: bool, write_id: str | None) -> str | None:
    """Why the checkpoint file at `path` cannot be used, or None when it can."""
    if not os.path.exists(path):
        return f"{os.path.basename(path)} is missing"
    try:
        with CheckpointFile(path) as ckpt:
            return _problem(ckpt, deep, write_id)
    except CheckpointError as exc:
        return str(exc)


def _problem(ckpt: CheckpointFile, deep: bool, write_id: str | None) -> str | None:
    name = os.path.basename(ckpt.path)
    if write_id is not None and ckpt.write_id != write_id:
        return f"{name} comes from another save than the commit record (unfinished overwrite)"
    try:
        damaged = ckpt.damaged_records() if deep else []
    except CheckpointError as exc:
        return str(exc)
    if damaged:
        return f"{name} is damaged: {', '.join(damaged)} fail their checksums"
    return structure_problem(ckpt)


def list_checkpoints(root: str, deep: bool = False) -> list[CheckpointInfo]:
    """Every checkpoint directly under `root`, complete or not, oldest first (by commit time, or
    modification time for incomplete ones). A checkpoint that cannot be read is listed as
    incomplete with the reason; nothing in one checkpoint makes the listing fail."""
    root = os.fspath(root)
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or os.path.islink(path):
            continue
        try:
            if os.path.isfile(path) or os.path.isdir(path) and _looks_like_checkpoint_dir(path):
                found.append(describe_checkpoint(path, deep))
        except NotACheckpointError:
            continue  # hparams.yaml, logs and the like
        except FileNotFoundError:
            logger.debug("checkpoint %s vanished while it was listed (retention); skipped", path)
        except (OSError, CheckpointError) as exc:
            found.append(CheckpointInfo(path, "unknown", False, f"cannot be read: {exc}", 0, None))
    return sorted(found, key=_listing_time)


def _listing_time(info: CheckpointInfo) -> float:
    if info.committed_at is not None:
        return info.committed_at
    try:
        return os.path.getmtime(info.path)
    except FileNotFoundError:
        return 0.0


def _looks_like_checkpoint_dir(path: str) -> bool:
    names = os.listdir(path)
    return (
        COMMIT_RECORD in names
        or METADATA_FILE in names
        or any(name.startswith(("checkpoint_", TEMPORARY_PREFIX)) for name in names)
    )


def _written_by_dcp(path: str) -> bool:
    """Whether the directory is a checkpoint stock torch.distributed.checkpoint wrote (its
    `.metadata`, written last, and none of our index files, which a commit record must name)."""
    names = os.listdir(path)
    return METADATA_FILE in names and not any(name.startswith(INDEX_PREFIX) for name in names)


def find_latest(root: str, deep: bool = False) -> str | None:
    """The newest complete checkpoint under `root` (None when there is none).

    Incomplete (uncommitted) and damaged checkpoints are skipped, each with a logged reason,
    so a resume after a crash picks the last one that was committed whole. `deep=True` reads
    every byte against its checksums instead of checking structure, sizes and commit records.
    """
    for info in reversed(list_checkpoints(root, deep)):
        if info.complete:
            return info.path
        logger.warning("skipping checkpoint %s: %s", info.path, info.reason)
    return None


def update_latest(root: str, name: str) -> None:
    """Point `root/latest` at `name` (a symlink, replaced atomically). A `latest` that is not a
    symlink is the user's: it is left alone and the pointer is not moved."""
    pointer = os.path.join(root, LATEST)
    if os.path.lexists(pointer) and not os.path.islink(pointer):
        logger.warning("not moving %s to %s: it is not a symlink, so it is not ours to replace", pointer, name)
        return
    temporary = os.path.join(root, f".{LATEST}.{os.getpid()}.tmp")
    if os.path.lexists(temporary):
        os.unlink(temporary)
    os.symlink(name, temporary)
    os.replace(temporary, pointer)


def read_latest(root: str) -> str | None:
    """The checkpoint `root/latest` points at, or None when there is no pointer."""
    pointer = os.path.join(root, LATEST)
    if not os.path.islink(pointer):
        return None
    return os.path.join(root, os.readlink(pointer))
