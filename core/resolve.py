"""Which file one rank reads for a checkpoint path: the file itself, or its rank's file of a
directory checkpoint as the commit record lists it (another rank's for another world size)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from .checkpoint_file import CheckpointFile
from .commit import COMMIT_RECORD, CommitRecord, read_commit_record
from .errors import CheckpointError, CheckpointNotFoundError, WorldSizeMismatchError
from .types import RankInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedFile:
    """The file one rank reads, and the write id its commit record expects in it (None: a plain file)."""

    path: str
    write_id: str | None = None


def resolve_checkpoint_file(path: str, rank_info: RankInfo, source_rank: int | None = None) -> ResolvedFile:
    """The file holding this rank's checkpoint at `path`: the path itself, or the directory's
    file for this rank as its commit record lists it (see `_source_rank` for other world sizes).

    A directory without a commit record is read as torch's _experimental writer lays it out
    (PATH/checkpoint_<rank>.pt) when that file is a plain torch.save file; a file async-ckpt
    wrote there without committing it is an interrupted save, and absent.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError("the checkpoint path is empty; name the file or directory to load")
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise CheckpointNotFoundError(f"Checkpoint file not found: {path}")
        return ResolvedFile(path)
    if not os.path.exists(os.path.join(path, COMMIT_RECORD)):
        candidate = os.path.join(path, f"checkpoint_{rank_info.global_rank if source_rank is None else source_rank}.pt")
        if os.path.isfile(candidate) and not _written_by_us(candidate):
            return ResolvedFile(candidate)
    record = read_commit_record(path)  # UncommittedCheckpointError (a FileNotFoundError) without one
    entry = record.file_of(_source_rank(path, record, rank_info, source_rank))
    candidate = os.path.join(path, entry.file)
    if not os.path.exists(candidate):
        raise CheckpointNotFoundError(
            f"checkpoint {path!r} is committed but rank {entry.rank}'s file {entry.file} is not here. With "
            "per-node local disks each node holds only its own ranks' files: load on the node that wrote it"
        )
    return ResolvedFile(candidate, entry.write_id)


def _written_by_us(path: str) -> bool:
    try:
        with CheckpointFile(path) as ckpt:
            return ckpt.write_id is not None
    except CheckpointError:
        return False


def _source_rank(path: str, record: CommitRecord, rank_info: RankInfo, source_rank: int | None) -> int:
    """Whose file this rank loads: its own with the same world size; rank 0's when the checkpoint
    has one rank or every rank saved the same state (as DDP ranks do); else `source_rank`."""
    if source_rank is not None:
        if not 0 <= source_rank < record.world_size:
            raise ValueError(f"source_rank={source_rank}, but checkpoint {path!r} has ranks 0..{record.world_size - 1}")
        return source_rank
    if record.world_size == rank_info.global_world_size:
        return rank_info.global_rank
    if record.world_size == 1:
        return 0
    if _replicated(path, record):
        logger.info(
            "checkpoint %s: written by %d ranks with identical state; loading rank 0's on %d ranks",
            path,
            record.world_size,
            rank_info.global_world_size,
        )
        return 0
    raise WorldSizeMismatchError(
        f"checkpoint {path!r} was written by {record.world_size} ranks and this job has "
        f"{rank_info.global_world_size}. Its ranks saved different state (sharded, or per-rank values), which "
        "cannot be re-split here. Load it with the same number of ranks, or pass source_rank=k to give every "
        "rank the state rank k saved (right when the state is replicated, e.g. a DDP model and optimizer)"
    )


def _replicated(path: str, record: CommitRecord) -> bool:
    """Whether every rank's file holds the same bytes, judged from their manifests' checksums."""
    summaries = []
    for entry in record.files:
        try:
            with CheckpointFile(os.path.join(path, entry.file)) as ckpt:
                manifest = ckpt.manifest
        except CheckpointError:
            return False
        if manifest is None or manifest.get("checksum") is None:
            return False
        summaries.append((manifest["data.pkl"]["digest"], json.dumps(manifest["storages"], sort_keys=True)))
    return len(set(summaries)) == 1
