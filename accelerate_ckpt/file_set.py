"""Checkpoints made of several files, committed as one folder: FileSetCheckpointer.

Each save snapshots every file's state dict (the caller may change them once save() returns),
writes the files in the background into a private staging folder, and, once every rank's files
are durable (a vote over the job's TCPStore), publishes the folder (see publish.py). The save's
future resolves when the folder is published; a failure leaves nothing behind, not even the
staging folder. Saves are published in the order they were made. Deleting the checkpoint's
folder while its save runs cancels the save quietly: nothing is recreated, the future
resolves to a WriteResult with `cancelled=True`; so does a save cancelled with
`cancel_all_but_newest` (a writer that fell behind then skips what retention would delete).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from core import (
    BarrierTimeoutError,
    CheckpointerConfig,
    CheckpointWriteError,
    RankInfo,
    TCPStoreBarrier,
    WriteResult,
    WriterHook,
    drain,
    make_async_checkpointer,
    wrap_future,
)
from core.checkpointer import AsyncCheckpointer
from core.interrupts import sigint_deferred
from core.outstanding import OutstandingWrites, WriteFuture, settle
from core.pending import pending_writes
from core.types import CheckpointStats

from .publish import publish_directory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedState:
    """One file of a multi-file checkpoint: its name in the folder and what it holds."""

    name: str
    state: Any
    file_format: str = "torch"  # or "safetensors" (a flat dict of tensors)


OK, FAILED, CANCELLED = "ok", "failed", "cancelled"  # a rank's outcome of one save, and the save's


class CommitVote:
    """Each rank says how its files of one save ended (durable, failed, or cancelled before they
    were written); the publishing rank publishes only when every rank's are durable, and every
    rank returns once it has.

    Runs over a TCPStoreBarrier (a client of the MASTER_ADDR:MASTER_PORT store that torchrun and
    accelerate launch set up), from a background thread, without touching the training process
    group. A single process needs no store.
    """

    def __init__(self, rank: int, world_size: int, name: str, timeout_secs: float) -> None:
        self._name = name
        self._barrier = None
        if world_size > 1:
            self._barrier = TCPStoreBarrier(
                rank, world_size, barrier_prefix=f"async_ckpt/file_set/{name}", timeout_secs=timeout_secs
            )

    def cast(self, outcome: str) -> str:
        """Vote this rank's outcome, wait for every rank's vote, and return the save's: FAILED if
        any rank's files failed, else CANCELLED if any rank's were cancelled, else OK."""
        if self._barrier is None:
            return outcome
        try:
            votes = {vote["outcome"] for vote in self._barrier.exchange({"outcome": outcome})}
        except BarrierTimeoutError as exc:
            raise BarrierTimeoutError(f"checkpoint {self._name} was not committed: {exc}") from exc
        return next(o for o in (FAILED, CANCELLED) if o in votes) if votes != {OK} else OK

    def published(self, all_ok: bool) -> None:
        """Every rank returns once the publishing rank, which arrives after publishing, has."""
        if self._barrier is not None and all_ok:
            self._barrier.execute_barrier()


@dataclass(frozen=True)
class _Save:
    final: str
    staging: str
    publishes: bool
    vote: CommitVote
    start: float
    blocking_seconds: float
    after_publish: Callable[[str], None] | None


class FileSetCheckpointer:
    """Saves several state dicts as the files of one checkpoint folder; see the module docstring.

    `rank`/`world_size` are the job's; every rank calls save() for the same folder, each with the
    files it writes; the rank that passes publishes=True moves the folder into place.
    """

    def __init__(
        self,
        config: CheckpointerConfig,
        commit_hook: WriterHook | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self._config = config
        self._commit_hook = commit_hook
        self._rank, self._world_size = rank, world_size
        self._checkpointer: AsyncCheckpointer | None = None
        self._committer: ThreadPoolExecutor | None = None
        self._writes = OutstandingWrites()
        # The saves handed over and not yet committed, oldest first (staging folder -> final
        # folder), and those of them asked to cancel.
        self._queued: dict[str, str] = {}
        self._cancelling: set[str] = set()
        self._why_skipped: str | None = None  # why saves were asked to cancel: said once, at the first skipped
        self._said_skipped = False
        self._queued_lock = threading.Lock()
        self._generation = 0
        self.stats = CheckpointStats()
        self.on_committed: list[Callable[[WriteResult], None]] = []
        self._open = True
        drain.register(self, drain_on_sigterm=config.process_config.sigterm_drain_secs > 0)

    def save(
        self,
        final: str,
        files_in: Callable[[str], list[NamedState]],
        *,
        staging: str,
        publishes: bool,
        after_publish: Callable[[str], None] | None = None,
    ) -> WriteFuture:
        """Create `staging` (a new folder on `final`'s filesystem), let `files_in(staging)` write
        what it writes there and name the states to save, snapshot those and write them there;
        the future resolves to a WriteResult once every rank's files are published at `final`.
        `after_publish(final)` runs on the publishing rank right after (e.g. pruning). A save that
        fails (or is interrupted) before it is under way leaves no staging folder behind."""
        self.raise_unseen()
        start = time.perf_counter()
        writes: list[Future[Any]] = []
        future: WriteFuture | None = None
        try:
            with sigint_deferred():  # a Ctrl-C is raised after the assignment, inside this try
                future = self._writes.start(final)
            os.makedirs(staging)
            files = files_in(staging)
            checkpointer = self._ensure_checkpointer(len(files))
            for file in files:
                staged, written = checkpointer.save(
                    os.path.join(staging, file.name),
                    file.state,
                    file_format=file.file_format,
                    report_errors=False,
                    create_folder=False,  # a staging folder deleted meanwhile (with its checkpoint) stays deleted
                    private_folder=True,  # published (synced, moved) with the others by _commit
                )
                staged.result()
                writes.append(written)
            self._generation += 1
            vote = CommitVote(
                self._rank,
                self._world_size,
                f"{os.path.basename(final)}#{self._generation}",
                self._config.writer_config.write_barrier_timeout_secs,
            )
            save = _Save(final, staging, publishes, vote, start, time.perf_counter() - start, after_publish)
            assert self._committer is not None
            with sigint_deferred():
                with self._queued_lock:
                    self._queued[staging] = final
                self._committer.submit(self._commit, save, writes, future)
                future.handed_over = True
        except BaseException as exc:
            if future is not None and not future.handed_over:
                self._dequeue(staging)
                future.observed = True
                settle(future, error=exc)
                self._remove_staging(staging, writes)
            raise
        return future

    def cancel_all_but_newest(self, count: int, why: str = "newer ones replace it") -> list[tuple[str, Future[None]]]:
        """Cancel the pending saves older than the newest `count` (at least one is kept) whose
        files the writer has not taken up: it writes none of them, and each such save resolves as
        cancelled (`WriteResult.cancelled`), nothing published, its staging folder removed and
        its final folder too where that leaves it empty. A save the writer has begun is written
        whole (so a writer slower than the saves still completes one after another). Returns the
        final folder of each save this call asked to cancel (each is asked once) with a future
        that completes once the writer has the request; never waits. The first save skipped so
        is logged (a warning, once), saying `why`."""
        with self._queued_lock:
            older = list(self._queued.items())[: max(len(self._queued) - max(count, 1), 0)]
            asked = [(staging, final) for staging, final in older if staging not in self._cancelling]
            self._cancelling.update(staging for staging, _ in asked)
            self._why_skipped = why
        checkpointer = self._checkpointer
        return [
            (final, checkpointer.cancel(staging) if checkpointer else wrap_future(None)) for staging, final in asked
        ]

    def _dequeue(self, staging: str) -> None:
        with self._queued_lock:
            self._queued.pop(staging, None)
            self._cancelling.discard(staging)

    def _ensure_checkpointer(self, files_per_save: int) -> AsyncCheckpointer:
        if self._checkpointer is None:
            config = _with_slabs_per_save(self._config, files_per_save)
            self._checkpointer = make_async_checkpointer(config, RankInfo(0, 1), commit_hook=self._commit_hook)
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="async-ckpt-file-set-commit")
        return self._checkpointer

    def _commit(self, save: _Save, writes: list[Future[Any]], future: WriteFuture) -> None:
        try:
            result = self._publish_when_durable(save, writes)
        except _Cancelled:
            self._say_skipped(save.final)
            remove_if_empty(save.final)
            self._settle_cancelled(save, future)
            return
        except BaseException as exc:
            if os.path.isdir(save.final) and not _removed_under_it(exc, save.final):
                settle(future, error=exc)
                return
            logger.info("checkpoint %s was deleted while it was being written; that save is cancelled", save.final)
            self._remove_staging(save.staging, [])
            self._settle_cancelled(save, future)
            return
        self.stats.record(result)
        logger.info(
            "checkpoint %s committed: blocked %.3f s, %.1f MB durable after %.3f s",
            save.final,
            result.blocking_seconds,
            result.nbytes / 1e6,
            result.persist_seconds,
        )
        for callback in self.on_committed:
            callback(result)
        settle(future, result=result)

    def _say_skipped(self, final: str) -> None:
        if self._said_skipped:
            logger.debug("checkpoint %s was skipped before its files were written", final)
            return
        self._said_skipped = True
        logger.warning(
            "the checkpoint writer fell behind: %s was skipped, its files not written (%s); said once",
            final,
            self._why_skipped,
        )

    def _settle_cancelled(self, save: _Save, future: WriteFuture) -> None:
        settle(future, result=WriteResult(path=save.final, files=(), nbytes=0, write_seconds=0.0, cancelled=True))

    def _publish_when_durable(self, save: _Save, writes: list[Future[Any]]) -> WriteResult:
        errors = [f.exception() for f in writes]  # every file finished, not just up to the first failure
        self._dequeue(save.staging)  # (nothing of it is left to cancel)
        failure = next((e for e in errors if e is not None), None)
        cancelled = failure is None and any(getattr(f.result(), "skipped", False) for f in writes)
        outcome = save.vote.cast(FAILED if failure is not None else CANCELLED if cancelled else OK)
        if save.publishes and outcome == OK:
            publish_directory(save.staging, save.final)
            remove_if_empty(os.path.dirname(save.staging))
            if save.after_publish is not None:
                save.after_publish(save.final)
        elif outcome != OK:
            self._remove_staging(save.staging, [])
        save.vote.published(outcome == OK)
        if failure is not None:
            raise failure
        if outcome == CANCELLED:
            raise _Cancelled()
        if outcome != OK:
            raise CheckpointWriteError(
                f"checkpoint {save.final} was not committed: another rank failed to write its files"
            )
        written = [f.result() for f in writes]
        return WriteResult(
            path=save.final,
            files=tuple(os.path.join(save.final, os.path.basename(w.path)) for w in written),
            nbytes=sum(w.nbytes for w in written),
            write_seconds=max((w.write_seconds for w in written), default=0.0),
            blocking_seconds=save.blocking_seconds,
            persist_seconds=time.perf_counter() - save.start,
        )

    @staticmethod
    def _remove_staging(staging: str, writes: list[Future[Any]]) -> None:
        # Nothing may still be writing into it: neither `writes` nor a write that a save handed
        # over before a Ctrl-C interrupted it (the caller never got its future).
        for write in [*writes, *pending_writes(staging, holding_it=False)]:
            write.exception()
        shutil.rmtree(staging, ignore_errors=True)
        remove_if_empty(os.path.dirname(staging))

    def raise_unseen(self) -> None:
        """Raise the first failure of a save that nobody has seen on its future (once)."""
        self._writes.raise_unseen()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save so far is published (or failed), then give back the staging
        memory lent for a burst of saves; raise the first unseen failure."""
        self._writes.wait(timeout)
        checkpointer = self._checkpointer
        if checkpointer is not None:
            checkpointer.trim_staging()
        self._writes.raise_unseen()

    def drain_for_signal(self) -> None:
        """Wait up to sigterm_drain_secs for pending saves; called from the SIGTERM handler."""
        self._writes.wait_for_signal(self._config.process_config.sigterm_drain_secs)

    def release(self) -> None:
        """Drain, then stop the writer process; the next save starts a new one. Returns within
        drain_timeout_secs: saves not published by then fail with DrainTimeoutError."""
        limit = self._config.process_config.drain_timeout_secs
        deadline = time.monotonic() + limit
        drained = False
        try:
            drained = self._writes.give_up_after(limit)
        finally:
            checkpointer, self._checkpointer = self._checkpointer, None
            committer, self._committer = self._committer, None
            if checkpointer is not None:  # first: a commit waiting for one of its files then fails at once
                checkpointer.close(timeout=max(deadline - time.monotonic(), 0.0) if drained else 0.0)
            if committer is not None:
                committer.shutdown(wait=True)
        self._writes.raise_unseen()

    def close(self) -> None:
        """release(), for good; idempotent."""
        if self._open:
            self._open = False
            drain.unregister(self)
            self.release()


class _Cancelled(Exception):
    """Some rank's files of the save were cancelled before they were written: nothing is published."""


def _with_slabs_per_save(config: CheckpointerConfig, files_per_save: int) -> CheckpointerConfig:
    """`config` with room for `max_in_flight` whole saves of `files_per_save` files each
    (every file of a save holds a staging slab of its own); everything else kept."""
    staging = config.staging_config
    in_flight = staging.max_in_flight * max(files_per_save, 1)
    return dataclasses.replace(config, staging_config=dataclasses.replace(staging, max_in_flight=in_flight))


def _removed_under_it(error: BaseException, final: str) -> bool:
    """Whether `error` is something of the checkpoint folder `final` gone missing while its save
    was published: only a deletion of that folder removes what a pending save put there, and one
    still under way (rmtree removes the files first) leaves the folder itself for a while."""
    if isinstance(error, CheckpointWriteError):  # a file's write: every one goes into `final`'s staging
        return error.errno == errno.ENOENT
    if isinstance(error, FileNotFoundError):
        names = [os.fspath(name) for name in (error.filename, error.filename2) if name]
        return any(name == final or name.startswith(final + os.sep) for name in names)
    return False


def remove_if_empty(directory: str) -> None:
    """Remove `directory` if it is empty."""
    try:
        os.rmdir(directory)
    except OSError:
        pass  # not empty (another checkpoint is pending) or already gone
