"""Checkpointer, SyncCheckpointer and AsyncCheckpointer: the calls a training loop makes."""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any, Protocol

from . import drain
from .config import CheckpointProcessConfig
from .dedupe import LastSave, RepeatedSaves
from .errors import CheckpointerClosedError, MissingKeysError
from .futures import wrap_future
from .interrupts import InterruptSafeEvent, sigint_deferred
from .outstanding import OutstandingWrites, WriteFuture, settle
from .pending import wait_for_pending_writes
from .process import CheckpointProcess, HandoverFuture
from .protocol import WriteOptions
from .reader import CheckpointReader
from .staging import CheckpointStager, DefaultStager, StagedStateDict
from .types import STATE_DICT, CheckpointStats, WriteResult
from .writer import CheckpointWriter

logger = logging.getLogger(__name__)


class Checkpointer(abc.ABC):
    """Saves and loads checkpoints. A context manager: leaving the block closes it."""

    @abc.abstractmethod
    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future[Any], Future[Any]] | None:
        """Save `state_dict` at `path`: None once written (sync), or (stage_future, write_future)."""

    @abc.abstractmethod
    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> STATE_DICT:
        """Load the checkpoint at `path`: all of it, or only the keys of `state_dict`, in place.

        strict=True raises MissingKeysError (a RuntimeError) when the checkpoint lacks keys of
        `state_dict`. `map_location` (torch.load's name) is accepted for `default_map_location`
        (torch's checkpointer's name). kwargs: weights_only (default True), verify (default True), source_rank
        (load another rank's file of a directory checkpoint; see CheckpointReader.read).
        """

    def wait(self) -> None:  # noqa: B027 - a synchronous checkpointer has nothing to wait for
        """Block until every save issued so far is committed; raise the first unreported error."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish outstanding work and release every resource; idempotent."""

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


_skips_logged: set[str] = set()


def _note_skipped(result: WriteResult) -> None:
    """Say once per kind of skip what happened (the writer fell behind, or a save was removed)."""
    kind = "superseded" if result.superseded else "cancelled"
    if kind in _skips_logged:
        return
    _skips_logged.add(kind)
    if result.superseded:
        logger.warning(
            "the checkpoint writer fell behind: a queued save of %s was skipped because a newer save of the same "
            "path was queued behind it (which replaces it anyway); said once",
            result.path,
        )
    else:
        logger.info("a queued save of %s was not written: it was removed before the writer reached it", result.path)


def _record(stats: CheckpointStats, result: WriteResult) -> None:
    stats.record(result)
    logger.info(
        "checkpoint %s: blocked %.3f s, %.1f MB durable after %.3f s (written at %.2f GB/s%s)",
        result.path,
        result.blocking_seconds,
        result.nbytes / 1e6,
        result.persist_seconds,
        result.throughput_gbps,
        f", {result.reused_nbytes / 1e6:.1f} MB reused" if result.reused_nbytes else "",
    )


def _load(
    reader: CheckpointReader,
    path: str,
    state_dict: STATE_DICT | None,
    default_map_location: Any,
    strict: bool,
    **kwargs: Any,
) -> STATE_DICT:
    map_location = kwargs.pop("map_location", None)  # torch.load's name for it, which users type
    if map_location is not None and default_map_location is not None:
        raise TypeError("load() got both map_location and default_map_location; pass one")
    map_location = default_map_location if map_location is None else map_location
    wait_for_pending_writes(path)
    loaded: STATE_DICT
    loaded, missing = reader.read(path, state_dict, map_location=map_location, strict=strict, **kwargs)
    if strict and missing:  # a reader of torch's shape reports missing keys and leaves strictness to us
        raise MissingKeysError(f"Checkpoint at {path} is missing keys: {missing}")
    return loaded


class SyncCheckpointer(Checkpointer):
    """Writes in the calling thread: save() returns (None, as torch's does) once the checkpoint is
    committed. `stats.last` holds that save's WriteResult."""

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader) -> None:
        self._writer = writer
        self._reader = reader
        self._closed = False
        self.stats = CheckpointStats()

    def save(
        self, path: str, state_dict: STATE_DICT, *, extra_files: Mapping[str, bytes] | None = None, **kwargs: Any
    ) -> None:
        """Write and commit `state_dict` at `path`; on error nothing is left under the final name.
        `extra_files` (see AsyncCheckpointer.save) go with sharded checkpoints."""
        if self._closed:
            raise CheckpointerClosedError("save() on a closed SyncCheckpointer; create a new one")
        start = time.perf_counter()
        options = WriteOptions(extra_files=tuple((extra_files or {}).items()))
        result = self._writer.write(path, state_dict, options=options, **kwargs)
        if isinstance(result, WriteResult):
            elapsed = time.perf_counter() - start
            _record(
                self.stats,
                dataclasses.replace(
                    result, blocking_seconds=elapsed, persist_seconds=elapsed, copied_nbytes=result.nbytes
                ),
            )
        return None

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> STATE_DICT:
        return _load(self._reader, path, state_dict, default_map_location, strict, **kwargs)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()


class ProcessOfTorchShape(Protocol):
    """What AsyncCheckpointer needs of its process: torch's CheckpointProcess shape. Ours
    (core.CheckpointProcess) also takes WriteOptions and a close() timeout."""

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Future[Any]: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class _Save:
    """One save on its way to the writer."""

    path: str
    kwargs: dict[str, Any]
    options: WriteOptions
    future: WriteFuture
    start: float


class AsyncCheckpointer(Checkpointer):
    """Saves cost the caller only the snapshot; a writer process persists them.

    save() returns (stage_future, write_future). stage_future completes (with None, as torch's)
    when the caller may change every tensor and container it passed: the checkpoint holds the
    values at the call, and with the default stager the request is then already in the writer's
    hands (it commits it even if this process dies right after). write_future resolves to a
    WriteResult once the checkpoint is durable and committed, or fails with the writer's error.
    A failure nobody has looked at on its future is raised, once, by the next save(), wait() or
    close(). close() waits at most `drain_timeout_secs` (CheckpointProcessConfig) for pending
    writes, then fails them with DrainTimeoutError naming each path. `stats` holds the totals.
    """

    def __init__(
        self,
        checkpoint_stager: CheckpointStager,
        checkpoint_process: ProcessOfTorchShape,
        reader: CheckpointReader,
        *,
        drain_timeout_secs: float | None = None,
        sigterm_drain_secs: float | None = None,
    ) -> None:
        self._stager = checkpoint_stager
        self._process = checkpoint_process
        self._reader = reader
        if isinstance(checkpoint_process, CheckpointProcess):
            process_config = checkpoint_process.config
        else:
            process_config = CheckpointProcessConfig()
        self._drain_timeout = drain_timeout_secs or process_config.drain_timeout_secs
        self._sigterm_drain_secs = (
            process_config.sigterm_drain_secs if sigterm_drain_secs is None else sigterm_drain_secs
        )
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()  # stats
        self._writes = OutstandingWrites()
        self._repeats = RepeatedSaves()
        self._closed = False
        self.stats = CheckpointStats()
        drain.register(self, drain_on_sigterm=self._sigterm_drain_secs > 0)

    @property
    def stager(self) -> CheckpointStager:
        return self._stager

    @property
    def process(self) -> ProcessOfTorchShape:
        """The CheckpointProcess that writes this checkpointer's saves."""
        return self._process

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid (None when it is not running)."""
        return self._process.pid if isinstance(self._process, CheckpointProcess) else None

    # -- saving

    def save(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        report_errors: bool = True,
        dedupe_key: Any = None,
        create_folder: bool = True,
        extra_files: Mapping[str, bytes] | None = None,
        private_folder: bool = False,
        **kwargs: Any,
    ) -> tuple[Future[None], Future[WriteResult]]:
        """Snapshot `state_dict` and write it to `path` in the background.

        kwargs reach the stager and the writer, as in torch: file_format ("torch", the default,
        or "safetensors", a flat dict of tensors) and values for the commit hooks and the
        checkpoint's metadata (e.g. step=100). report_errors=False: a failure of this save is
        reported on its write future only (not again by save/wait/close). create_folder=False:
        the write fails if the checkpoint's folder is missing (instead of creating it).
        private_folder=True: the folder is a staging folder that the caller publishes once its
        files are durable; the file is written there under its name, with no temporary folder,
        rename or folder sync (see WriteOptions).

        dedupe_key: when it equals the previous save's and nothing changed since (the same
        pickled structure, the same tensors with the same version counters, the same other
        keyword arguments), this save copies nothing and writes nothing: its file shares the
        previous one's extents where the filesystem can, else is a hard link to it (an in-kernel
        copy where neither works), still a standalone checkpoint. Pass a value that changes
        whenever the state may change behind PyTorch's back (e.g. the global step: Lightning's
        ModelCheckpoint saves a top-k file and last.ckpt of one step this way).

        A state dict holding DTensors is saved as a sharded checkpoint: every rank calls save()
        with the same path, each writes the chunks it owns, and the directory is committed once
        all have (see docs/distributed.md). extra_files: {name: bytes} that rank 0 writes into
        that directory with the commit, which records their digests (loads check them).
        """
        self._check_usable()
        self._writes.raise_unseen()
        path = os.fspath(path)
        if not path:
            raise ValueError("the checkpoint path is empty; name a file or directory to save to")
        save: _Save | None = None
        handed_over: InterruptSafeEvent | None = None
        staging: STATE_DICT | Future[STATE_DICT]
        try:
            # A Ctrl-C during these steps is raised after each assignment, inside this try: the save
            # then either fails here as a whole or, once handed over, goes on to completion.
            with sigint_deferred():
                options = WriteOptions(
                    create_folder=create_folder,
                    extra_files=tuple((extra_files or {}).items()),
                    private_folder=private_folder,
                )
                save = _Save(path, kwargs, options, WriteFuture(), 0.0)
                save.future = self._writes.start(path, report_errors)
                save.start = time.perf_counter()
            versions = self._repeats.versions(dedupe_key, state_dict)
            plan_of = self._stager.plan_of if isinstance(self._stager, DefaultStager) else None
            again = plan_of and self._repeats.repeat_of(dedupe_key, versions, state_dict, kwargs, plan_of)
            if again and again.lease.hold():  # its slab still holds that snapshot
                staging, handed_over = self._save_again(again, save)
                return wrap_future(staging), save.future
            staging = self._stager.stage(state_dict, **kwargs)
            if isinstance(staging, StagedStateDict):  # (never its truth value: that would build the snapshot)
                self._repeats.remember(dedupe_key, versions, kwargs, staging.plan, staging.lease, path)
            else:
                self._repeats.remember(dedupe_key, None, kwargs, None, None, path)
            if isinstance(staging, Future):
                later = staging
                with sigint_deferred():
                    save.future.handed_over = True
                    later.add_done_callback(lambda done: self._staged_later(done, save))
            else:
                handed_over = self._hand_over(staging, save)
        except BaseException as exc:
            if save is not None and not save.future.handed_over:
                save.future.observed = True  # raised to the caller right here
                settle(save.future, error=exc)
            raise
        finally:
            if handed_over is not None:
                handed_over.wait()  # a Ctrl-C here interrupts the caller; the write still completes
        return wrap_future(staging), save.future

    def _save_again(self, again: LastSave, save: _Save) -> tuple[StagedStateDict, InterruptSafeEvent | None]:
        """Save the previous snapshot, still in its slab (held by the caller), under `save.path`:
        the writer links or clones the file it committed from it."""
        try:
            staging = StagedStateDict(again.plan, again.lease, copied_nbytes=0)
            save.options = dataclasses.replace(save.options, link_from=again.path)
            handed_over = self._hand_over(staging, save)
        finally:
            again.lease.release()
        self._repeats.repeated_at(again, save.path)
        return staging, handed_over

    def _staged_later(self, done: Future[STATE_DICT], save: _Save) -> None:
        error = done.exception()
        if error is not None:
            save.future.set_exception(error)
            return
        try:
            self._hand_over(done.result(), save)
        except BaseException as exc:  # already on the write future; nobody to raise it to here
            logger.debug("handing over %s failed: %s", save.path, exc)

    def _hand_over(self, staged: STATE_DICT, save: _Save) -> InterruptSafeEvent | None:
        """Give the staged state to the process; the write future follows the process's future.

        Returns the event set once the request is in the writer's hands (None if not known).
        """
        blocking_seconds = time.perf_counter() - save.start
        lease = staged.lease if isinstance(staged, StagedStateDict) else None
        with sigint_deferred():
            held = lease is not None and lease.hold()  # the stager must not reuse the slab while it is written

            def release() -> None:
                if held and lease is not None:
                    lease.release()

            written: Future[Any]
            try:
                if isinstance(self._process, CheckpointProcess):
                    written = self._process.write(staged, save.path, options=save.options, **save.kwargs)
                else:
                    written = self._process.write(staged, save.path, **save.kwargs)
            except BaseException as exc:
                release()
                save.future.observed = True
                settle(save.future, error=exc)
                raise

            def finish(done: Future[Any]) -> None:
                release()
                error = done.exception()
                if error is not None:
                    settle(save.future, error=error)
                    return
                result = done.result()
                if isinstance(result, WriteResult) and result.skipped:
                    _note_skipped(result)
                elif isinstance(result, WriteResult):
                    copied = staged.copied_nbytes if isinstance(staged, StagedStateDict) else result.nbytes
                    result = dataclasses.replace(
                        result,
                        blocking_seconds=blocking_seconds,
                        persist_seconds=time.perf_counter() - save.start,
                        copied_nbytes=copied,
                    )
                    with self._lock:
                        _record(self.stats, result)
                settle(save.future, result=result)

            written.add_done_callback(finish)
            save.future.handed_over = True
        return written.handed_over if isinstance(written, HandoverFuture) else None

    def cancel(self, path: str) -> Future[None]:
        """Do not write the pending saves to `path`, or into the folder `path`, that the writer
        has not started (single-rank checkpointers; the Lightning plugin calls it when a
        checkpoint is removed before its write, the Accelerate hook for a checkpoint that
        total_limit would delete before it is written). Their write futures resolve with
        `WriteResult.cancelled` set. A write already under way finishes as usual, and so do the
        others this call names (the files of one checkpoint are written all or none). The
        returned future completes once the writer has the request (and every save issued
        before it)."""
        if isinstance(self._process, CheckpointProcess):
            return self._process.cancel(os.fspath(path))
        return wrap_future(None)

    def prepare(self, state_dict: STATE_DICT, *, file_format: str = "torch") -> Future[None]:
        """Get the staging memory for saves of `state_dict`'s shape ready in the background.

        Optional: call it once (e.g. after building the model and optimizer) so that the first
        save costs only the copy. The future completes when the memory is ready.
        """
        self._check_usable()
        if isinstance(self._stager, DefaultStager):
            return self._stager.prepare(state_dict, file_format)
        return wrap_future(None)

    # -- errors

    def _check_usable(self) -> None:
        if os.getpid() != self._owner_pid:
            raise CheckpointerClosedError(
                f"this checkpointer belongs to process {self._owner_pid}, and this is process {os.getpid()} (a fork "
                "of it); its writer cannot be shared. Create a new checkpointer in the child"
            )
        if self._closed:
            raise CheckpointerClosedError("this AsyncCheckpointer is closed; create a new one")

    def wait(self, timeout: float | None = None) -> None:
        """Block until every save issued so far has finished (at most `timeout` s); raise the
        first failure not yet seen on its future. Staging memory lent for a burst of saves goes back."""
        self._writes.wait(timeout)
        self.trim_staging()
        self._writes.raise_unseen()

    def trim_staging(self) -> None:
        """Give back now the staging memory lent beyond max_in_flight for a burst of saves, if
        every save so far is written (else it goes back at a later save, wait() or close())."""
        if isinstance(self._stager, DefaultStager):
            self._stager.pool.trim()

    def drain_for_signal(self) -> None:
        """Wait up to sigterm_drain_secs for pending writes; called from the SIGTERM handler."""
        self._writes.wait_for_signal(self._sigterm_drain_secs)

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> STATE_DICT:
        """Load `path` after any pending write to it has finished (see Checkpointer.load)."""
        return _load(self._reader, path, state_dict, default_map_location, strict, **kwargs)

    # -- closing

    def close(self, timeout: float | None = None) -> None:
        """Drain every save, stop the writer process and free the staging memory; idempotent.

        Returns within `timeout` seconds (default: drain_timeout_secs): writes not finished by
        then fail with DrainTimeoutError naming each path, and the writer is stopped at once.
        Raises the first failure not yet seen on its future."""
        if self._closed:
            return
        self._closed = True
        drain.unregister(self)
        if os.getpid() != self._owner_pid:
            return  # a forked child: the parent's writer and memory are the parent's to release
        limit = self._drain_timeout if timeout is None else max(timeout, 0.0)
        deadline = time.monotonic() + limit
        drained = False
        try:
            drained = self._writes.give_up_after(limit)
        finally:
            left = max(deadline - time.monotonic(), 0.0) if drained else 0.0
            _close_process(self._process, left)
            self._stager.close()
        self._writes.raise_unseen()


def _close_process(process: ProcessOfTorchShape, timeout: float) -> None:
    """Close the process within `timeout` (one of torch's shape takes none)."""
    if isinstance(process, CheckpointProcess):
        process.close(timeout=timeout)
    else:
        process.close()
