"""The write and commit of one rank's part of a sharded checkpoint (see dcp_format.py).

Each rank writes its file into a private temporary folder inside the checkpoint directory and
fsyncs it. The ranks then agree (every part durable, the same path, no failure) and exchange
where their items lie; each gives its file its final name (new for every save, so an overwrite
never mixes with the files of the checkpoint it replaces); once all have, rank 0 writes the
index, DCP's `.metadata` and last `commit.json`, then removes the files of the checkpoint that
commit replaced. A rank that dies before the commit leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from .agreement import RankAgreement
from .commit import (
    COMMIT_RECORD,
    CommitRecord,
    RankFile,
    is_plain_name,
    new_write_id,
    read_commit_record,
    write_commit_record,
)
from .config import CheckpointWriterConfig
from .dcp_format import (
    INDEX_PREFIX,
    METADATA_FILE,
    PlacedItem,
    dcp_metadata,
    index_content,
    index_file_name,
    rank_file_name,
    write_durably,
    write_rank_file,
)
from .errors import CheckpointCommitError, CheckpointError
from .file_writer import StepClock, WrittenFile
from .fsutil import fsync_directory, process_umask
from .leftovers import new_temporary_folder
from .locks import exclusive
from .manifest import digest
from .sharded_plan import ShardedStructure
from .types import RankInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardedWritten:
    """This rank's file of a committed sharded checkpoint and the writer's seconds per step."""

    final: str
    file: WrittenFile
    clock: StepClock


class ShardedCommit:
    """Writes and commits this rank's part of sharded checkpoints; one per CheckpointWriter."""

    def __init__(
        self,
        config: CheckpointWriterConfig,
        rank_info: RankInfo,
        agreement: RankAgreement,
        executor: Executor | None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._agreement = agreement
        self._executor = executor

    def write(
        self,
        directory: str,
        structure: bytes,
        storage_bytes: Sequence[torch.Tensor],
        metadata: dict[str, Any],
        series: str | None,
        before_commit: Any,
        extra_files: tuple[tuple[str, bytes], ...] = (),
    ) -> ShardedWritten:
        """Write this rank's file into `directory` and commit the checkpoint with the other ranks.

        `before_commit()` runs once the file is durable, before any rank publishes anything.
        `extra_files` (rank 0's): written beside the checkpoint and committed with it."""
        _check_extra_files(extra_files)
        if not self._config.shared_filesystem and self._rank_info.global_world_size > 1:
            raise CheckpointCommitError(
                "a sharded checkpoint (a state dict holding DTensors) needs every rank's file on one shared "
                "filesystem: rank 0 indexes all of them. Set shared_filesystem=True and save to one"
            )
        if self._rank_info.global_world_size > 1 and not self._agreement.exchanges:
            raise CheckpointCommitError(
                "a sharded checkpoint needs a barrier that exchanges values between ranks (rank 0 indexes every "
                "rank's items): leave BarrierConfig at 'auto', or name 'dist_barrier' or 'tcp_store'"
            )
        clock = StepClock()
        rank = self._rank_info.global_rank
        plan = ShardedStructure.decode(structure)
        write_id = new_write_id()
        name = rank_file_name(rank, write_id)
        final = os.path.join(directory, name)
        temporary_directory = new_temporary_folder(directory)
        try:
            try:
                temporary = os.path.join(temporary_directory, name)
                os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                written, placed = write_rank_file(
                    temporary,
                    name,
                    plan,
                    storage_bytes,
                    executor=self._executor,
                    use_direct_io=self._config.use_direct_io,
                    checksums=self._config.checksums,
                )
                clock.mark("file")
                before_commit()
                clock.mark("pre_commit")
            except BaseException as exc:
                self._agreement.tell_failure(directory, exc)
                raise
            mine = RankFile(rank, name, written.nbytes, write_id)
            agreed = self._agreement.agree(
                directory,
                {
                    "file": mine.__dict__,
                    "items": [item.to_json() for item in placed],
                    "mapping": [[fqn, list(path)] for fqn, path in plan.mapping.items()],
                },
            )
            assert agreed is not None
            clock.mark("barrier")
            self._publish(temporary, final, directory, agreed, Commit(metadata, series, write_id, extra_files))
            clock.mark("publish")
        finally:
            shutil.rmtree(temporary_directory, ignore_errors=True)
        return ShardedWritten(final, written, clock)

    def _publish(
        self,
        temporary: str,
        final: str,
        directory: str,
        agreed: list[dict[str, Any]],
        commit: Commit,
    ) -> None:
        os.chmod(temporary, 0o666 & ~process_umask())
        os.replace(temporary, final)
        fsync_directory(directory)

        def commit_record() -> None:
            if self._rank_info.global_rank == 0:
                self._commit(directory, agreed, commit)

        self._agreement.commit_together(directory, final, commit_record)

    def _commit(self, directory: str, agreed: list[dict[str, Any]], commit: Commit) -> None:
        """Rank 0: the extra files, the index, DCP's metadata and the commit record, then the
        replaced checkpoint's files."""
        files = tuple(RankFile(**payload["file"]) for payload in agreed)
        items = _once_each([PlacedItem.from_json(raw) for payload in agreed for raw in payload["items"]])
        mapping = {fqn: tuple(path) for fqn, path in agreed[0]["mapping"]}
        index = index_content(items, mapping, self._config.checksums)
        index_name = index_file_name(commit.write_id)
        with exclusive(directory):
            replaced = _committed_files(directory)
            for name, content in commit.extra_files:
                write_durably(directory, name, content)
            write_durably(directory, index_name, index)
            write_durably(
                directory,
                METADATA_FILE,
                _pickled(dcp_metadata(items, mapping, checkpoint_id=directory, save_id=commit.write_id)),
            )
            record = CommitRecord(
                self._rank_info.global_world_size,
                files,
                metadata=commit.metadata,
                shared_filesystem=True,
                series=commit.series,
                index_file=index_name,
                index_digest=digest(index),
                extra_files={name: digest(content) for name, content in commit.extra_files},
            )
            write_commit_record(directory, record)
            for name in replaced - {index_name, *(f.file for f in files)}:
                _remove_replaced(os.path.join(directory, name))


@dataclass(frozen=True)
class Commit:
    """What rank 0 commits besides the ranks' files."""

    metadata: dict[str, Any]
    series: str | None
    write_id: str
    extra_files: tuple[tuple[str, bytes], ...]


_OURS = (COMMIT_RECORD, METADATA_FILE)


_warned_of_duplicates = False


def _once_each(items: list[PlacedItem]) -> list[PlacedItem]:
    """Every chunk once: the lowest rank's where several ranks wrote the same one. That happens
    only when DTensors live on meshes that leave ranks out and those ranks hold the same tensor
    on a mesh of their own (replicated across a mesh dimension the model does not use): no rank
    can tell that alone, without a collective."""
    kept: dict[tuple[str, Any], PlacedItem] = {}
    for item in items:
        kept.setdefault((item.fqn, item.offsets), item)
    if len(kept) < len(items):
        global _warned_of_duplicates
        log = logger.debug if _warned_of_duplicates else logger.warning
        _warned_of_duplicates = True
        log(
            "%d chunk(s) were written by several ranks (e.g. %s): their DTensors are replicated across ranks "
            "outside their device mesh; the lowest rank's copy is committed",
            len(items) - len(kept),
            next(item.fqn for item in items if kept[(item.fqn, item.offsets)] is not item),
        )
    return list(kept.values())


def _check_extra_files(extra_files: tuple[tuple[str, bytes], ...]) -> None:
    for name, content in extra_files:
        if not is_plain_name(name) or name in _OURS or name.startswith(("__", INDEX_PREFIX, ".async")):
            raise ValueError(
                f"extra file {name!r}: name a plain file inside the checkpoint directory, not one of the "
                "checkpoint's own (commit.json, .metadata, __<rank>_*.distcp, async_ckpt_index_*)"
            )
        if not isinstance(content, bytes):
            raise TypeError(f"extra file {name!r}: its content is {type(content).__name__}, not bytes")


def _pickled(metadata: Any) -> bytes:
    """DCP's .metadata: the Metadata object pickled, as FileSystemWriter.finish writes it."""
    import pickle

    return pickle.dumps(metadata)


def _committed_files(directory: str) -> set[str]:
    """The files the commit in `directory` names (a sharded one's rank files and index); none when
    there is no readable commit: then nothing there is known to be ours to replace."""
    if not os.path.exists(os.path.join(directory, COMMIT_RECORD)):
        return set()
    try:
        record = read_commit_record(directory)
    except (CheckpointError, OSError) as exc:
        logger.warning("leaving the files of the checkpoint replaced in %s alone: %s", directory, exc)
        return set()
    names = {entry.file for entry in record.files}
    return names | ({record.index_file} if record.index_file else set())


def _remove_replaced(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # the new checkpoint is committed; an old file left over is only space
        logger.warning("cannot remove %s, a file of the checkpoint just replaced: %s", path, exc)
