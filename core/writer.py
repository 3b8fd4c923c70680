"""CheckpointWriter: turns a captured state into a committed, durable checkpoint file."""

from __future__ import annotations

import abc
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Sequence

import torch

from .barriers import Barrier, BarrierTimeoutError
from .commit import CommitRecord, RankFile, new_write_id, write_commit_record
from .config import CheckpointWriterConfig
from .errors import CheckpointCommitError, CheckpointError
from .file_format import WrittenFile, filesystem_clones, fsync_directory, write_checkpoint_file, write_safetensors_file
from .incremental import PreviousFiles
from .plan import CheckpointPlan, capture
from .retention import apply_retention
from .types import RankInfo, WriteResult

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


class WriterHook(abc.ABC):
    """Actions around a commit: pre_commit runs once the files are durable, before they take
    their final names; post_commit after they have."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:  # noqa: B027 - optional hook
        """Called with the checkpoint path before the commit."""

    def post_commit(self, path: str, **kwargs: Any) -> None:  # noqa: B027 - optional hook
        """Called with the checkpoint path after the commit."""


def checkpoint_file_path(path: str, layout: str, rank: int) -> str:
    """The file one rank's checkpoint lives in for a layout."""
    return os.path.join(path, f"checkpoint_{rank}.pt") if layout == "directory" else path


class CheckpointWriter:
    """Writes checkpoints atomically: temporary file, fsync, barrier, rename, directory fsync.

    Nothing exists under the final name until the whole file is durable, so an interrupted
    write leaves the previous checkpoint at that path intact.
    """

    def __init__(
        self,
        config: CheckpointWriterConfig,
        rank_info: RankInfo,
        barrier: Barrier | None = None,
        commit_hook: WriterHook | None = None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._barrier = barrier
        self._commit_hook = commit_hook
        if rank_info.global_world_size > 1:
            if config.layout != "directory":
                raise ValueError(
                    f"layout {config.layout!r} writes one file at the path, but this job has "
                    f"{rank_info.global_world_size} ranks; use layout='directory' (each rank writes PATH/checkpoint_<rank>.pt)"
                )
            if barrier is None:
                raise ValueError(
                    f"a checkpoint written by {rank_info.global_world_size} ranks needs a barrier to commit it; "
                    "leave BarrierConfig at its default ('auto') or name 'dist_barrier' or 'tcp_store'"
                )
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            config.threads, thread_name_prefix="async-ckpt-io"
        )
        self._previous_files = PreviousFiles()

    @property
    def config(self) -> CheckpointWriterConfig:
        return self._config

    def write(self, path: str, state_dict: Any, file_format: str = "torch", **kwargs: Any) -> WriteResult:
        """Write a live state dict (copied first where it is not on the CPU) and commit it."""
        captured = capture(state_dict, file_format)
        storage_bytes = [s if s.device.type == "cpu" else s.cpu() for s in captured.sources]
        return self.write_staged(path, captured.plan, storage_bytes, **kwargs)

    def write_staged(
        self, path: str, plan: CheckpointPlan, storage_bytes: Sequence[torch.Tensor], **kwargs: Any
    ) -> WriteResult:
        """Write a planned checkpoint whose storage bytes are `storage_bytes` (CPU uint8) and commit it.

        Keyword arguments reach the commit hook; those with plain values (str, int, float, bool)
        are also recorded as the checkpoint's metadata (e.g. step=100).
        """
        if self._executor is None:
            raise RuntimeError("CheckpointWriter is closed")
        start = time.perf_counter()
        path = os.fspath(path)
        final = checkpoint_file_path(path, self._config.layout, self._rank_info.global_rank)
        directory = os.path.dirname(os.path.abspath(final))
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{os.path.basename(final)}.{new_write_id()[:12]}.tmp")
        write_id = new_write_id()
        metadata = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}
        try:
            try:
                # Created private; given the usual permissions only when it takes its final name.
                os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                written = self._write_file(temporary, plan, storage_bytes, write_id, metadata)
                nbytes = written.nbytes
                if self._commit_hook is not None:
                    self._commit_hook.pre_commit(path, **kwargs)
            except BaseException as exc:
                self._tell_peers_of_failure(path, exc)
                raise
            mine = RankFile(self._rank_info.global_rank, os.path.basename(final), nbytes, write_id)
            files = self._agree(path, mine)
            self._publish(temporary, final, directory, files, metadata)
        except BaseException as exc:
            if os.path.exists(temporary):
                os.unlink(temporary)
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointError) and exc.filename is None:
                # e.g. ENOSPC from a write: say which checkpoint it was
                raise OSError(exc.errno, f"{exc.strerror} while writing checkpoint {final}") from exc
            raise
        self._remember_for_the_next_save(plan, final)
        if self._commit_hook is not None:
            self._commit_hook.post_commit(path, **kwargs)
        self._maintain(path)
        seconds = time.perf_counter() - start
        logger.info(
            "checkpoint %s committed: %.1f MB in %.3f s (%.2f GB/s)",
            final, nbytes / 1e6, seconds, nbytes / max(seconds, 1e-9) / 1e9,
        )
        return WriteResult(
            path=path, files=(final,), nbytes=nbytes, write_seconds=seconds, reused_nbytes=written.reused_nbytes
        )

    def _write_file(
        self, path: str, plan: CheckpointPlan, storage_bytes: Sequence[torch.Tensor], write_id: str, metadata: dict
    ) -> WrittenFile:
        io_options = dict(
            executor=self._executor, use_direct_io=self._config.use_direct_io, chunk_bytes=self._config.chunk_bytes
        )
        if plan.format == "safetensors":
            return write_safetensors_file(path, plan.structure, storage_bytes, **io_options)
        known_digests, previous = None, None
        lineage = plan.lineage
        if lineage is not None and lineage.chunk_bytes == self._config.chunk_bytes:
            known_digests = lineage.digests
            if self._copies_unchanged(os.path.dirname(path)):
                sizes = {str(i): b.numel() for i, b in enumerate(storage_bytes)}
                previous = self._previous_files.records_for(lineage, sizes)
        return write_checkpoint_file(
            path,
            plan.structure,
            storage_bytes,
            checksums=self._config.checksums,
            extra_metadata={
                "rank": self._rank_info.global_rank,
                "world_size": self._rank_info.global_world_size,
                "write_id": write_id,
                "metadata": metadata,
            },
            known_digests=known_digests,
            previous=previous,
            **io_options,
        )

    def _remember_for_the_next_save(self, plan: CheckpointPlan, final: str) -> None:
        """Hold the committed file of an incremental save; failing that only costs the next save its reuse."""
        if plan.lineage is None or plan.format != "torch":
            return
        try:
            self._previous_files.remember(plan.lineage, final)
        except (OSError, CheckpointError, RuntimeError) as exc:
            logger.warning("the next incremental save will write everything: cannot reopen %s (%s)", final, exc)

    def _copies_unchanged(self, directory: str) -> bool:
        """Copying from the previous file pays only where the filesystem shares extents (or copies
        server-side); elsewhere it reads and writes the bytes that the snapshot already holds."""
        mode = self._config.copy_unchanged
        return mode == "always" or (mode == "auto" and filesystem_clones(directory))

    def _tell_peers_of_failure(self, path: str, exc: BaseException) -> None:
        """Let the other ranks fail this save now, with this rank's reason, instead of at their timeout."""
        if self._barrier is None or isinstance(exc, BarrierTimeoutError):
            return
        try:
            self._barrier.exchange({"path": os.path.normpath(path), "error": f"{type(exc).__name__}: {exc}"})
        except BarrierTimeoutError:
            pass

    def _agree(self, path: str, mine: RankFile) -> list[RankFile]:
        """Wait until every rank's file is durable; every rank must be saving the same path."""
        if self._barrier is None:
            return [mine]
        payloads = self._barrier.exchange({"path": os.path.normpath(path), "file": asdict(mine)})
        failed = {rank: p["error"] for rank, p in enumerate(payloads) if p.get("error")}
        if failed:
            raise CheckpointCommitError(
                f"checkpoint {path!r} was not committed: rank(s) {sorted(failed)} failed to write their part: {failed}"
            )
        paths: dict[str, list[int]] = {}
        for rank, payload in enumerate(payloads):
            paths.setdefault(payload["path"], []).append(rank)
        if len(paths) > 1:
            raise CheckpointCommitError(
                f"ranks saved to different paths in the same save ({paths}); every rank must call save() with "
                "the same path at the same point of training. Nothing was committed"
            )
        return [RankFile(**payload["file"]) for payload in payloads]

    def _publish(self, temporary: str, final: str, directory: str, files: list[RankFile], metadata: dict) -> None:
        """Give this rank's file its final name; in the directory layout, commit once every rank has."""
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, final)
        fsync_directory(directory)
        if self._config.layout != "directory":
            return
        try:
            if self._barrier is not None:
                self._barrier.execute_barrier()
            if self._writes_commit_record:
                record = CommitRecord(
                    self._rank_info.global_world_size, tuple(files), metadata=metadata,
                    shared_filesystem=self._config.shared_filesystem,
                )
                write_commit_record(directory, record)
        except BaseException:
            os.unlink(final)
            raise

    def _maintain(self, path: str) -> None:
        """The retention config's work after a commit, by the rank that commits for this filesystem."""
        retention = self._config.retention
        if retention is None or not self._writes_commit_record:
            return
        try:
            apply_retention(path, retention)
        except OSError as exc:
            logger.warning("retention after committing %s failed (the checkpoint itself is committed): %s", path, exc)

    @property
    def _writes_commit_record(self) -> bool:
        info = self._rank_info
        return info.global_rank == 0 or (not self._config.shared_filesystem and info.local_rank == 0)

    def close(self) -> None:
        """Stop the I/O threads; idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._previous_files.close()

