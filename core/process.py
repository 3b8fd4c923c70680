"""CheckpointProcess: a persistent worker process that writes staged checkpoints.

Only plans (a few KiB) cross the pipe; the worker maps each staging slab once, through a
descriptor passed over the pipe, and reads the bytes from it. A background sender thread
starts (or restarts) the worker and sends requests, so save() never waits for a spawn; a
receiver thread resolves the write futures and notices a worker that dies. If the trainer
dies, the worker still finishes every write it had received, then exits.
"""

from __future__ import annotations

import itertools
import json
import logging
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, Callable

import torch

from .config import BarrierConfig, CheckpointProcessConfig, CheckpointWriterConfig
from .errors import BarrierTimeoutError, CheckpointCommitError, CheckpointWriteError, WriterProcessDiedError
from .staging import StagedCheckpoint
from .types import RankInfo, WriteResult
from .writer import CheckpointWriter, WriterHook

logger = logging.getLogger(__name__)


def default_subprocess_init_fn(*args: Any) -> None:
    """Runs first in the worker; the default does nothing."""


def default_writer_init_fn(
    rank_info: RankInfo,
    writer_config: CheckpointWriterConfig | None = None,
    barrier_config: BarrierConfig | None = None,
    commit_hook: WriterHook | None = None,
) -> CheckpointWriter:
    """Builds the worker's CheckpointWriter, with the barrier its config names."""
    from .barriers import create_barrier_from_config

    writer_config = writer_config or CheckpointWriterConfig()
    barrier = create_barrier_from_config(
        barrier_config or BarrierConfig(), rank_info, in_writer_process=True,
        timeout_secs=writer_config.write_barrier_timeout_secs,
    )
    return CheckpointWriter(writer_config, rank_info, barrier, commit_hook)


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "it stopped answering"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# ---------------------------------------------------------------- the worker process side


_SYS_PATH_ENV = "ASYNC_CKPT_WORKER_SYS_PATH"
_WORKER_BOOTSTRAP = (
    "import json, os, sys; sys.path[:0] = json.loads(os.environ.pop('ASYNC_CKPT_WORKER_SYS_PATH')); "
    "from core.process import worker_main; worker_main(int(sys.argv[1]))"
)


def worker_main(fd: int) -> None:
    """Entry point of the writer process: serve write requests on the connection `fd`.

    It is started as a fresh interpreter (not multiprocessing's spawn), so the trainer's
    __main__ module is never re-run in it.
    """
    # The trainer handles Ctrl-C and preemption; the worker finishes what it has and exits on EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        rank_info, subprocess_init_fn, subprocess_init_args, writer_init_fn, writer_init_args = conn.recv()
        subprocess_init_fn(*subprocess_init_args)
        writer = writer_init_fn(rank_info=rank_info, **writer_init_args)
    except BaseException:
        conn.send(("init_failed", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    try:
        _serve(conn, writer)
    finally:
        writer.close()


def _serve(conn: Connection, writer: CheckpointWriter) -> None:
    slabs: dict[str, torch.Tensor] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone and everything it sent has been written
        kind = message[0]
        if kind == "shutdown":
            return
        if kind == "attach":
            _, slab_id, nbytes = message
            with os.fdopen(recv_handle(conn), "rb", buffering=0) as f:
                slabs[slab_id] = torch.frombuffer(mmap.mmap(f.fileno(), nbytes), dtype=torch.uint8)
        elif kind == "detach":
            slabs.pop(message[1], None)
        elif kind == "write":
            _, request_id, path, plan, slab_id, kwargs = message
            status, payload = _write_one(writer, slabs[slab_id], path, plan, kwargs)
            try:
                conn.send((status, request_id, payload))
            except OSError:
                logger.warning("checkpoint %s handled (%s) but the trainer is gone", path, status)


def _write_one(writer: CheckpointWriter, slab: torch.Tensor, path: str, plan: Any, kwargs: dict) -> tuple:
    try:
        storage_bytes = [slab[s.slab_offset : s.slab_offset + s.nbytes] for s in plan.storages]
        return "done", writer.write_staged(path, plan, storage_bytes, **kwargs)
    except BaseException as exc:
        return "error", (type(exc).__name__, f"{type(exc).__name__}: {exc}\n\nWriter traceback:\n{traceback.format_exc()}")


# ---------------------------------------------------------------- the trainer side

# Writer errors that keep their type across the process boundary (others become CheckpointWriteError).
_WRITE_ERRORS_BY_NAME = {cls.__name__: cls for cls in (BarrierTimeoutError, CheckpointCommitError)}


def _wait(process: subprocess.Popen, timeout: float) -> bool:
    """Whether the process exited within `timeout` seconds."""
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    attached: set[str] = field(default_factory=set)
    pending: dict[int, Future] = field(default_factory=dict)
    alive: bool = True
    receiver: threading.Thread | None = None


class CheckpointProcess:
    """Writes staged checkpoints in a spawned worker process; see the module docstring."""

    def __init__(
        self,
        rank_info: RankInfo,
        config: CheckpointProcessConfig,
        subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
        subprocess_init_args: tuple[Any, ...] = (),
        checkpoint_writer_init_fn: Callable[..., CheckpointWriter] = default_writer_init_fn,
        checkpoint_writer_init_args: dict[str, Any] | None = None,
    ) -> None:
        self._rank_info = rank_info
        self._config = config
        self._init = (
            subprocess_init_fn,
            subprocess_init_args,
            checkpoint_writer_init_fn,
            checkpoint_writer_init_args or {},
        )
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards pending requests, worker liveness and the queue count
        self._send_lock = threading.Lock()  # one message at a time on the connection
        self._worker: _Worker | None = None
        self._requests: queue.Queue = queue.Queue()
        self._queued = 0  # requests put on the queue and not yet handled by the sender thread
        self._closed = False
        self._sender = threading.Thread(target=self._send_loop, name="async-ckpt-sender", daemon=True)
        self._sender.start()
        self._enqueue(("start",))  # spawn now, so the first save finds the worker ready

    @property
    def pid(self) -> int | None:
        worker = self._worker
        return worker.process.pid if worker is not None and worker.alive else None

    def write(self, path: str, staged: StagedCheckpoint, **kwargs: Any) -> Future[WriteResult]:
        """Hand a write of `staged` to `path` to the worker; the future resolves once it is committed.

        When the worker is running and nothing is queued before it, the request is sent before
        this returns, so the worker commits it even if this process dies right after. Otherwise
        (the worker is starting) it is queued and sent by the sender thread.
        """
        if self._closed:
            raise RuntimeError("CheckpointProcess is closed")
        future: Future[WriteResult] = Future()
        with self._lock:
            worker = self._worker
            direct = self._queued == 0 and worker is not None and worker.alive
            if direct:
                request_id = self._register(worker, future)
            else:
                self._queued += 1
                self._requests.put(("write", path, staged, kwargs, future))
        if direct:
            self._send_request(worker, request_id, path, staged, kwargs)
        return future

    def forget_slab(self, slab_id: str) -> None:
        """Tell the worker to unmap a slab that the trainer discarded.

        Sent at once rather than queued: a queued message would make the next write wait for the
        sender thread, and a trainer killed right after that save would lose it.
        """
        if not self._closed:
            try:
                self._send_detach(slab_id)
            except OSError:
                logger.debug("checkpoint writer gone while detaching a slab; the receiver reports it")

    def _enqueue(self, item: tuple) -> None:
        with self._lock:
            self._queued += 1
            self._requests.put(item)

    def _register(self, worker: _Worker, future: Future) -> int:
        """Record a pending request of a live worker; call with self._lock held."""
        request_id = next(self._ids)
        worker.pending[request_id] = future
        return request_id

    # -- sender thread

    def _send_loop(self) -> None:
        while True:
            item = self._requests.get()
            kind = item[0]
            if kind == "stop":
                self._stop_worker()
                return
            try:
                if kind == "start":
                    self._ensure_worker()
                elif kind == "write":
                    self._send_write(*item[1:])
            except BaseException as exc:  # reported on the request's future, or logged
                if kind == "write" and not item[4].done():
                    item[4].set_exception(exc)
                else:
                    logger.warning("checkpoint writer process: %s", exc)
            finally:
                with self._lock:
                    self._queued -= 1

    def _send_detach(self, slab_id: str) -> None:
        worker = self._worker
        if worker is None or not worker.alive:
            return  # a new worker never saw the slab
        with self._send_lock:
            if slab_id in worker.attached:
                worker.attached.discard(slab_id)
                worker.conn.send(("detach", slab_id))

    def _send_write(self, path: str, staged: StagedCheckpoint, kwargs: dict, future: Future) -> None:
        for _attempt in range(2):  # a worker found dead here is replaced once
            worker = self._ensure_worker()
            with self._lock:
                if worker.alive:  # checked under the lock the receiver marks deaths under
                    request_id = self._register(worker, future)
                    break
        else:
            raise WriterProcessDiedError("the checkpoint writer process died twice while starting a write")
        self._send_request(worker, request_id, path, staged, kwargs)

    def _send_request(self, worker: _Worker, request_id: int, path: str, staged: StagedCheckpoint, kwargs: dict) -> None:
        slab = staged.slab
        try:
            with self._send_lock:
                if slab.slab_id not in worker.attached:
                    worker.conn.send(("attach", slab.slab_id, slab.nbytes))
                    send_handle(worker.conn, slab.fd, worker.process.pid)
                    worker.attached.add(slab.slab_id)
                worker.conn.send(("write", request_id, os.fspath(path), staged.plan, slab.slab_id, kwargs))
        except OSError:
            # The worker died; the receiver thread fails this request with how it died.
            logger.debug("send to checkpoint writer failed; it died")

    def _ensure_worker(self) -> _Worker:
        worker = self._worker
        if worker is not None and worker.alive:
            return worker
        self._worker = worker = self._spawn()
        worker.receiver = threading.Thread(
            target=self._receive_loop, args=(worker,), name="async-ckpt-receiver", daemon=True
        )
        worker.receiver.start()
        return worker

    def _spawn(self) -> _Worker:
        parent_socket, child_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with parent_socket, child_socket:
            env = {**os.environ, _SYS_PATH_ENV: json.dumps([p for p in sys.path if p])}
            process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOTSTRAP, str(child_socket.fileno())],
                pass_fds=(child_socket.fileno(),),
                env=env,
            )
            conn = Connection(os.dup(parent_socket.fileno()))
        try:
            conn.send((self._rank_info, *self._init))
            timeout = self._config.subprocess_init_timeout_secs
            if not conn.poll(timeout):
                raise TimeoutError(f"the checkpoint writer process did not start within {timeout} s")
            reply = conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            process.kill()
            process.wait(5)
            conn.close()
            detail = exc if isinstance(exc, TimeoutError) else describe_exit(process.returncode)
            raise WriterProcessDiedError(f"the checkpoint writer process failed to start: {detail}") from None
        if reply[0] != "ready":
            process.wait(5)
            conn.close()
            raise CheckpointWriteError(
                "the checkpoint writer process failed to initialise (init functions must be importable "
                f"module-level functions, not defined in __main__):\n{reply[1]}"
            )
        logger.debug("checkpoint writer process %d ready", process.pid)
        return _Worker(process=process, conn=conn)

    # -- receiver thread

    def _receive_loop(self, worker: _Worker) -> None:
        while True:
            try:
                kind, request_id, payload = worker.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = worker.pending.pop(request_id)
            if kind == "done":
                future.set_result(payload)
            else:
                error_type, message = payload
                future.set_exception(_WRITE_ERRORS_BY_NAME.get(error_type, CheckpointWriteError)(message))
        _wait(worker.process, 5)
        with self._lock:
            worker.alive = False
            orphans = list(worker.pending.values())
            worker.pending.clear()
        if orphans:
            error = WriterProcessDiedError(
                f"the checkpoint writer process (pid {worker.process.pid}) died: "
                f"{describe_exit(worker.process.returncode)}; the checkpoint was not committed "
                "(any previous checkpoint at that path is intact). The next save starts a new writer"
            )
            for future in orphans:
                future.set_exception(error)

    # -- shutdown

    def _stop_worker(self) -> None:
        worker = self._worker
        if worker is None:
            return
        if worker.alive:
            try:
                with self._send_lock:
                    worker.conn.send(("shutdown",))
            except OSError:
                pass
        if not _wait(worker.process, self._config.subprocess_shutdown_timeout_secs):
            logger.warning("checkpoint writer process did not stop in time; killing it")
            worker.process.kill()
            worker.process.wait()
        if worker.receiver is not None:
            worker.receiver.join()
        worker.conn.close()

    def close(self) -> None:
        """Stop the worker after the writes already queued, killing it after the shutdown timeout."""
        if self._closed:
            return
        self._closed = True
        self._enqueue(("stop",))
        self._sender.join()
