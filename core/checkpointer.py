"""Checkpointer, SyncCheckpointer and AsyncCheckpointer: the calls a training loop makes."""

from __future__ import annotations

import abc
import dataclasses
import glob
import logging
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

from . import drain
from .errors import CheckpointerClosedError, WriterProcessDiedError
from .process import CheckpointProcess
from .reader import CheckpointReader
from .staging import CheckpointStager, DefaultStager, StagedCheckpoint
from .types import STATE_DICT, CheckpointStats, WriteResult
from .writer import CheckpointWriter, checkpoint_file_path

logger = logging.getLogger(__name__)


class Checkpointer(abc.ABC):
    """Saves and loads checkpoints. A context manager: leaving the block closes it."""

    @abc.abstractmethod
    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> Any:
        """Save `state_dict` at `path`."""

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

        kwargs: weights_only (default True), verify (default True), source_rank (load another
        rank's file of a directory checkpoint; see CheckpointReader.read).
        """

    def wait(self) -> None:
        """Block until every save issued so far is committed; raise the first error."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish outstanding work and release every resource; idempotent."""

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _record(stats: CheckpointStats, result: WriteResult) -> None:
    stats.record(result)
    logger.info(
        "checkpoint %s: blocked %.3f s, %.1f MB durable after %.3f s (written at %.2f GB/s%s)",
        result.path, result.blocking_seconds, result.nbytes / 1e6, result.persist_seconds, result.throughput_gbps,
        f", {result.reused_nbytes / 1e6:.1f} MB reused" if result.reused_nbytes else "",
    )


def _load(reader: CheckpointReader, path: str, state_dict: STATE_DICT | None, map_location: Any, strict: bool, **kwargs: Any) -> STATE_DICT:
    loaded, _missing = reader.read(path, state_dict, map_location=map_location, strict=strict, **kwargs)
    return loaded


class SyncCheckpointer(Checkpointer):
    """Writes in the calling thread: save() returns once the checkpoint is committed."""

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader) -> None:
        self._writer = writer
        self._reader = reader
        self._closed = False
        self.stats = CheckpointStats()

    def save(self, path: str, state_dict: STATE_DICT, *, file_format: str = "torch", **kwargs: Any) -> WriteResult:
        """Write and commit `state_dict` at `path`; on error nothing is left under the final name."""
        if self._closed:
            raise CheckpointerClosedError("save() on a closed SyncCheckpointer; create a new one")
        start = time.perf_counter()
        result = self._writer.write(path, state_dict, file_format, **kwargs)
        elapsed = time.perf_counter() - start
        result = dataclasses.replace(
            result, blocking_seconds=elapsed, persist_seconds=elapsed, copied_nbytes=result.nbytes
        )
        _record(self.stats, result)
        return result

    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None,
             strict: bool = False, **kwargs: Any) -> STATE_DICT:
        return _load(self._reader, path, state_dict, default_map_location, strict, **kwargs)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()


class AsyncCheckpointer(Checkpointer):
    """Saves cost the caller only the snapshot; a writer process persists them.

    save() returns (stage_future, write_future). Once stage_future is done the caller may
    change every tensor and container it passed; the checkpoint holds the values at the
    call. write_future resolves to a WriteResult once the checkpoint is durable and
    committed, or fails with the writer's error. A failed write is also raised, once, by the
    next save(), wait() or close(), whichever comes first. `stats` holds the totals of
    committed saves; each one is logged at INFO.
    """

    def __init__(
        self,
        checkpoint_stager: CheckpointStager,
        checkpoint_process: CheckpointProcess,
        reader: CheckpointReader,
        layout: str = "directory",
        rank: int = 0,
        sigterm_drain_secs: float = 120,
    ) -> None:
        self._stager = checkpoint_stager
        self._process = checkpoint_process
        self._reader = reader
        self._layout = layout
        self._rank = rank
        self._lock = threading.Lock()
        self._outstanding: dict[Future, str] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._sigterm_drain_secs = sigterm_drain_secs
        self.stats = CheckpointStats()
        if isinstance(checkpoint_stager, DefaultStager):
            checkpoint_stager.pool.on_discard.append(checkpoint_process.forget_slab)
        drain.register(self, drain_on_sigterm=sigterm_drain_secs > 0)

    def save(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        file_format: str = "torch",
        report_errors: bool = True,
        **kwargs: Any,
    ) -> tuple[Future[StagedCheckpoint], Future[WriteResult]]:
        """Snapshot `state_dict` and write it to `path` in the background.

        file_format: "torch" (torch.save's zip, the default) or "safetensors" (a flat dict of
        tensors). report_errors=False: a failure of this save is reported on its write
        future only, for callers that handle it themselves (not again by save/wait/close).
        Other keyword arguments reach the commit hooks.
        """
        if self._closed:
            raise CheckpointerClosedError("save() on a closed AsyncCheckpointer; create a new one")
        self._raise_error()
        start = time.perf_counter()
        path = os.fspath(path)
        write_future: Future[WriteResult] = Future()
        with self._lock:
            self._outstanding[write_future] = path
        write_future.add_done_callback(lambda f: self._on_written(f, report_errors))
        try:
            stage_future = self._stager.stage(state_dict, file_format=file_format)
        except BaseException as exc:
            write_future.set_exception(exc)
            self._clear_error(exc)
            raise
        stage_future.add_done_callback(lambda f: self._write_staged(f, path, kwargs, write_future, start))
        return stage_future, write_future

    def prepare(self, state_dict: STATE_DICT, *, file_format: str = "torch") -> Future[None]:
        """Get the staging memory for saves of `state_dict`'s shape ready in the background.

        Optional: call it once (e.g. after building the model and optimizer) so that the first
        save costs only the copy. The future completes when the memory is ready.
        """
        if isinstance(self._stager, DefaultStager):
            return self._stager.prepare(state_dict, file_format)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _write_staged(
        self, stage_future: Future, path: str, kwargs: dict, write_future: Future, start: float
    ) -> None:
        blocking_seconds = time.perf_counter() - start
        error = stage_future.exception()
        if error is not None:
            write_future.set_exception(error)
            return
        staged: StagedCheckpoint = stage_future.result()
        try:
            written = self._process.write(path, staged, **kwargs)
        except BaseException as exc:
            staged.release()
            write_future.set_exception(exc)
            return

        def finish(done: Future) -> None:
            staged.release()
            if done.exception() is not None:
                if isinstance(done.exception(), WriterProcessDiedError):
                    self._remove_temporaries(path)
                write_future.set_exception(done.exception())
            else:
                result = dataclasses.replace(
                    done.result(),
                    blocking_seconds=blocking_seconds,
                    persist_seconds=time.perf_counter() - start,
                    copied_nbytes=staged.copied_nbytes,
                )
                with self._lock:
                    _record(self.stats, result)
                write_future.set_result(result)

        written.add_done_callback(finish)

    def _remove_temporaries(self, path: str) -> None:
        final = checkpoint_file_path(path, self._layout, self._rank)
        pattern = os.path.join(os.path.dirname(os.path.abspath(final)), f".{glob.escape(os.path.basename(final))}.*.tmp")
        for temporary in glob.glob(pattern):
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass

    def _on_written(self, future: Future, report_errors: bool) -> None:
        with self._lock:
            self._outstanding.pop(future, None)
            if report_errors and future.exception() is not None and self._error is None:
                self._error = future.exception()

    def _clear_error(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is exc:
                self._error = None

    def _raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _wait_for(self, paths: set[str] | None = None) -> None:
        with self._lock:
            futures = [f for f, p in self._outstanding.items() if paths is None or p in paths]
        wait_futures(futures)

    def wait(self) -> None:
        self._wait_for()
        self._raise_error()

    def drain_for_signal(self) -> None:
        """Wait up to sigterm_drain_secs for pending writes; called from the SIGTERM handler."""
        # No locks: the code the signal interrupted may hold them.
        pending = list(self._outstanding)
        if pending and self._sigterm_drain_secs > 0:
            logger.warning("SIGTERM: waiting up to %.0f s for %d checkpoint write(s)", self._sigterm_drain_secs, len(pending))
            done, not_done = wait_futures(pending, timeout=self._sigterm_drain_secs)
            if not_done:
                logger.error("SIGTERM: %d checkpoint write(s) did not finish in time", len(not_done))

    def wait_for_path(self, path: str) -> None:
        """Block until every save issued so far to `path` has finished (committed or failed).

        Unlike wait(), it does not raise a failure; that still surfaces as documented above.
        """
        self._wait_for({os.fspath(path)})

    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None,
             strict: bool = False, **kwargs: Any) -> STATE_DICT:
        """Load `path` after any pending write to it has finished (see Checkpointer.load)."""
        self.wait_for_path(path)
        return _load(self._reader, path, state_dict, default_map_location, strict, **kwargs)

    def close(self) -> None:
        """Drain every save, stop the writer process and free the staging memory; idempotent."""
        if self._closed:
            return
        try:
            self._wait_for()
        finally:
            self._closed = True
            drain.unregister(self)
            self._process.close()
            self._stager.close()
        self._raise_error()
