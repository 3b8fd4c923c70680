"""CheckpointProcess: the trainer's side of a persistent writer process.

`write(state_dict, path)` hands a write to the process and returns a future. A state dict
staged by DefaultStager travels as its plan plus the staging slab (mapped once by the writer);
any other state dict (or a future of one) has its storages moved into shared memory and passed
by descriptor, as torch.multiprocessing would pass them. Before `write` returns, the request is
in the writer's socket: if the trainer dies right after, the writer still writes and commits
it (from the moment the process is created, even while it is still starting up).

Every send happens on one sender thread, so a Ctrl-C in the training thread interrupts the
caller at once but never a half-sent message. A receiver thread per writer resolves the
futures and notices a writer that dies: its pending writes fail with how it died, its
temporary files are removed, and the next write starts a new writer. The writer is started
as a fresh interpreter that imports this distribution's `core`, whatever the trainer's
sys.path holds, and is given the trainer's sys.path after it for the user's init functions.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import queue
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from . import torch_internals, writer_pool
from .capture import capture
from .channel import Channel
from .config import CheckpointProcessConfig
from .errors import (
    BarrierTimeoutError,
    CheckpointCommitError,
    CheckpointerClosedError,
    CheckpointWriteError,
    WriterProcessDiedError,
    WriterStartError,
    WriterStartTimeoutError,
)
from .interrupts import InterruptSafeEvent, InterruptSafeFuture, sigint_deferred
from .leftovers import sweep_around
from .plan import CheckpointPlan
from .process_context import WriterProcess, WriterProcessContext, describe_exit
from .protocol import (
    RequestType,
    SharedSource,
    SlabSource,
    WorkerInit,
    WorkerRequest,
    WorkerResponse,
    WriteOptions,
    WriteOutcome,
    WriteRequest,
)
from .slab import Slab
from .staging import StagedStateDict
from .types import STATE_DICT, RankInfo, default_rank_info
from .writer_factory import default_subprocess_init_fn, default_writer_init_fn

__all__ = [
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "RequestType",
    "WorkerRequest",
    "WorkerResponse",
    "default_subprocess_init_fn",
    "default_writer_init_fn",
]

logger = logging.getLogger(__name__)

# Unique in the process, not per checkpointer: a writer from the pool keeps the ids it was told to
# cancel, and must never match them to another checkpointer's writes.
_request_ids = itertools.count()

_DEATH_GRACE_SECS = 5
_START_LIMIT_FACTOR = 20  # a writer still making progress gets this many init timeouts in all


class HandoverFuture(InterruptSafeFuture):
    """What CheckpointProcess.write returns: a future of the write, with `handed_over`, an event
    set once the request is in the writer's socket (from then on the writer commits it even if
    this process dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.handed_over = InterruptSafeEvent()


@dataclass(frozen=True)
class _Request:
    """What one write() asks of the writer besides the bytes."""

    path: str
    options: WriteOptions
    kwargs_pickle: bytes


@dataclass
class _Pending:
    future: Future[Any]
    path: str
    on_done: Callable[[], None]


@dataclass
class _Worker:
    context: WriterProcessContext
    channel: Channel  # sends (torch's name for it: _parent_end)
    inbox: Channel  # receives, on its own descriptor
    ready: Future[Any] = field(default_factory=Future)
    pending: dict[int, _Pending] = field(default_factory=dict)
    cancels: collections.deque[Future[None]] = field(default_factory=collections.deque)  # unanswered, in order
    attached: dict[str, weakref.ref[Slab]] = field(default_factory=dict)
    alive: bool = True
    released: bool = False  # answered a RELEASE_WRITER request: it waits in the pool for another checkpointer
    receiver: threading.Thread | None = None
    sys_path: tuple[str, ...] = ()

    @property
    def process(self) -> WriterProcess:
        return self.context.processes[0]


@dataclass
class _Outgoing:
    worker: _Worker
    request: WorkerRequest
    fds: list[int]
    request_id: int | None = None
    keepalive: Any = None  # what owns `fds` until they are sent
    sent: InterruptSafeEvent = field(default_factory=InterruptSafeEvent)


class CheckpointProcess:
    """Writes checkpoints in a persistent writer process; see the module docstring.

    `process_creation_future` completes when the writer is ready, or fails with
    WriterStartTimeoutError (a TimeoutError) after `subprocess_init_timeout_secs` or
    WriterStartError (a RuntimeError, with the writer's traceback) when an init function
    raises. Writes issued before that are held and written once it is ready.
    """

    def __init__(
        self,
        rank_info: RankInfo | None,
        config: CheckpointProcessConfig | None = None,
        subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
        subprocess_init_args: tuple[Any, ...] = (),
        checkpoint_writer_init_fn: Callable[..., Any] = default_writer_init_fn,
        checkpoint_writer_init_args: dict[str, Any] | None = None,
    ) -> None:
        self._rank_info = rank_info or default_rank_info()
        self.config = config or CheckpointProcessConfig()
        self._init_args = (
            self._rank_info,
            subprocess_init_fn,
            tuple(subprocess_init_args),
            checkpoint_writer_init_fn,
            dict(checkpoint_writer_init_args or {}),
        )
        self._owner_pid = os.getpid()
        # A writer that runs only our own init functions holds nothing of this checkpointer's
        # after it is closed: it may serve the next one (see writer_pool.py).
        self._poolable = (
            subprocess_init_fn is default_subprocess_init_fn and checkpoint_writer_init_fn is default_writer_init_fn
        )
        self._lock = threading.Lock()  # the current worker, its pending requests, the init failure
        self._outbox: queue.SimpleQueue[_Outgoing | None] = queue.SimpleQueue()  # (in C: see interrupts.py)
        # Requests leave in the order they were queued: by the sender thread, or by the caller
        # itself when nothing is queued or being sent (saving a thread hand-off per save).
        self._order = threading.Lock()  # _unsent and queueing
        self._unsent = 0  # queued or being sent
        self._send_lock = threading.Lock()  # held while a request is on its way into the socket
        self._closed = False
        self._start_failure: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name="async-ckpt-sender", daemon=True)
        self._sender.start()
        self._worker = self._start_worker()
        from . import drain

        drain.register(self, drain_on_sigterm=False)

    # -- what torch's CheckpointProcess exposes

    @property
    def process_creation_future(self) -> Future[None]:
        return self._worker.ready

    @property
    def process(self) -> WriterProcessContext:
        return self._worker.context

    @property
    def _parent_end(self) -> Channel:
        return self._worker.channel

    @property
    def pid(self) -> int | None:
        worker = self._worker
        return worker.process.pid if worker.alive else None

    # -- writes

    def write(
        self,
        state_dict: STATE_DICT | Future[STATE_DICT],
        path: str,
        *,
        options: WriteOptions | None = None,
        **kwargs: Any,
    ) -> HandoverFuture:
        """Write `state_dict` (or the state dict a future yields) to `path`; the future resolves
        to the writer's result (a WriteResult for CheckpointWriter) once it is committed.
        `options` tell the writer how (see WriteOptions); `kwargs` reach the writer's hooks."""
        self._check_usable()
        future = HandoverFuture()
        request = _Request(_absolute(os.fspath(path)), options or WriteOptions(), _pickled_kwargs(kwargs))
        if isinstance(state_dict, Future):
            state_dict.add_done_callback(lambda done: self._write_resolved(done, request, future))
        else:
            self._submit(state_dict, request, future)
        return future

    def cancel(self, path: str) -> Future[None]:
        """Ask the writer not to make the writes to `path`, or into the folder `path`, that it has
        not started (a single-rank writer skips them; a write already started finishes, and so
        do the others named here: all or none). Their futures resolve with a WriteResult whose
        `cancelled` is set, or as usual where the cancel came too late. The returned future
        completes when the writer has the request, and with it every request sent before (or at
        once, when there is no writer to ask)."""
        target = _absolute(os.fspath(path))
        inside = target.rstrip(os.sep) + os.sep
        received: Future[None] = InterruptSafeFuture()
        with sigint_deferred(), self._lock:  # (the answer's future and its request go together)
            worker = self._worker
            if not worker.alive or not worker.ready.done():
                received.set_result(None)  # (a writer still starting has started nothing)
            else:
                ids = tuple(
                    i
                    for i, pending in worker.pending.items()
                    if pending.path == target or pending.path.startswith(inside)
                )
                worker.cancels.append(received)
                self._queue(_Outgoing(worker, WorkerRequest(RequestType.CANCEL_WRITES, ids), []))
        return received

    def _write_resolved(self, done: Future[STATE_DICT], request: _Request, future: HandoverFuture) -> None:
        try:
            self._submit(done.result(), request, future)
        except BaseException as exc:
            future.handed_over.set()
            if not future.done():
                future.set_exception(exc)

    def _check_usable(self) -> None:
        if os.getpid() != self._owner_pid:
            raise CheckpointerClosedError(
                f"this checkpointer's writer belongs to process {self._owner_pid}, and this is process {os.getpid()} "
                "(a fork of it). A forked child cannot use its parent's writer: create a new checkpointer in the child"
            )
        if self._closed:
            raise CheckpointerClosedError("the checkpoint writer process was closed; create a new checkpointer")
        if self._start_failure is not None:
            raise self._start_failure

    def _submit(self, state_dict: STATE_DICT, request: _Request, future: HandoverFuture) -> None:
        """A state dict DefaultStager staged goes as its plan and slab; any other (or a staged one
        whose slab a later stage() took over: it kept a private copy) by shared memory."""
        if isinstance(state_dict, StagedStateDict):
            if state_dict.lease.hold():
                self._send_write(state_dict.slab, state_dict.plan, None, request, future, state_dict.lease.release)
                return
            state_dict = state_dict.copy()  # the plain dict it stands for, as torch.save would write it
        captured = capture(state_dict)
        shared = [_shared_fd(source.untyped_storage()) for source in captured.sources]
        self._send_write(None, captured.plan, shared, request, future, lambda: None)

    def _send_write(
        self,
        slab: Slab | None,
        plan: CheckpointPlan,
        shared: list[tuple[torch.UntypedStorage, int]] | None,
        request: _Request,
        future: HandoverFuture,
        on_done: Callable[[], None],
    ) -> None:
        try:
            with sigint_deferred():
                with self._lock:
                    worker = self._live_worker()
                    write, fds = self._write_request(worker, slab, plan, shared, request)
                    message = WorkerRequest(RequestType.WRITE_CHECKPOINT, write)
                    sent = future.handed_over
                    outgoing = _Outgoing(worker, message, fds, write.request_id, keepalive=shared, sent=sent)
                    # Registered and queued together, under the lock: requests leave in the order of their ids.
                    worker.pending[write.request_id] = _Pending(future, request.path, on_done)
                    now = self._queue(outgoing, may_send_now=worker.ready.done())
                if now:
                    self._send_queued(outgoing)
        except BaseException:
            on_done()
            future.handed_over.set()
            raise

    @staticmethod
    def _write_request(
        worker: _Worker,
        slab: Slab | None,
        plan: CheckpointPlan,
        shared: list[tuple[torch.UntypedStorage, int]] | None,
        request: _Request,
    ) -> tuple[WriteRequest, list[int]]:
        """The request for a write from `slab` (or `shared` storages), and the descriptors it carries."""
        fds: list[int]
        if slab is not None:
            attach = slab.slab_id not in worker.attached
            source: SlabSource | SharedSource = SlabSource(slab.slab_id, slab.nbytes, attach)
            fds = [slab.fd] if attach else []
            worker.attached[slab.slab_id] = weakref.ref(slab)
        else:
            assert shared is not None
            source = SharedSource(tuple(storage.nbytes() for storage, _ in shared))
            fds = [fd for _, fd in shared]
        forget = tuple(i for i, ref in list(worker.attached.items()) if _gone(ref))
        for slab_id in forget:
            del worker.attached[slab_id]
        write = WriteRequest(
            next(_request_ids), request.path, plan, source, request.kwargs_pickle, request.options, forget
        )
        return write, fds

    def _live_worker(self) -> _Worker:
        """The running writer, starting a new one when the last one died; call with the lock held."""
        if self._start_failure is not None:
            raise self._start_failure
        if not self._worker.alive:
            self._worker = self._start_worker()
        return self._worker

    # -- starting a writer

    def _start_worker(self) -> _Worker:
        """A writer for this process: an idle one from the pool when its init allows, else a new one."""
        sys_path = tuple(sys.path)
        idle = writer_pool.take(sys_path) if self._poolable else None
        if idle is not None:
            popen, parent = idle.popen, idle.sock
        else:
            popen, parent = writer_pool.spawn(sys_path, self.config.writer_niceness)
        worker = _Worker(WriterProcessContext(WriterProcess(popen)), Channel(parent), Channel(parent.dup()))
        worker.sys_path = sys_path
        worker.receiver = threading.Thread(
            target=self._receive_loop, args=(worker,), name="async-ckpt-receiver", daemon=True
        )
        worker.receiver.start()
        init = WorkerInit(
            *self._init_args, environ=dict(os.environ), cwd=os.getcwd(), niceness=self.config.writer_niceness
        )
        self._queue(_Outgoing(worker, WorkerRequest(RequestType.PING, init), []))
        return worker

    # -- sender thread

    def _queue(self, outgoing: _Outgoing, may_send_now: bool = False) -> bool:
        """Queue `outgoing` for the sender thread; or, when `may_send_now` and nothing is queued or
        being sent, take the send lock and return True: the caller sends it (_send_queued)."""
        with self._order:
            self._unsent += 1
            if may_send_now and self._unsent == 1:
                self._send_lock.acquire()  # (free: nothing else is being sent)
                return True
            self._outbox.put(outgoing)
            return False

    def _send_loop(self) -> None:
        while True:
            outgoing = self._outbox.get()
            if outgoing is None:
                return
            self._send_lock.acquire()
            self._send_queued(outgoing)

    def _send_queued(self, outgoing: _Outgoing) -> None:
        """Send a queued request (the caller holds the send lock), then say it is sent."""
        failure: Exception | None = None
        try:
            outgoing.worker.channel.send(outgoing.request, outgoing.fds)
        except Exception as exc:  # the writer is unreachable: its receiver reports the rest
            failure = exc
        finally:
            self._send_lock.release()
            with self._order:
                self._unsent -= 1
            outgoing.keepalive = None
        try:
            if failure is not None:
                self._on_send_failure(outgoing, failure)
        finally:
            outgoing.sent.set()

    def _on_send_failure(self, outgoing: _Outgoing, exc: Exception) -> None:
        worker = outgoing.worker
        error: CheckpointWriteError
        if outgoing.request.request_type is RequestType.PING and not isinstance(exc, OSError):
            error = WriterStartError(
                "the checkpoint writer's init functions or their arguments cannot be pickled, so the writer "
                f"process cannot receive them: {type(exc).__name__}: {exc}"
            )
            with self._lock:
                self._start_failure = error  # it would fail the same way again
        else:
            error = WriterProcessDiedError(
                f"Child process terminated unexpectedly: could not send to the checkpoint writer process "
                f"(pid {worker.process.pid}): {exc}. The next save starts a new writer"
            )
        with self._lock:
            worker.alive = False
            pending = worker.pending.pop(outgoing.request_id, None) if outgoing.request_id is not None else None
        if pending is not None:
            _finish(pending, error=error)
        if not worker.ready.done():
            worker.ready.set_exception(error)
        worker.inbox.shutdown()  # the writer reads end-of-file, finishes what it has and exits

    # -- receiver thread

    def _receive_loop(self, worker: _Worker) -> None:
        failure = self._await_ready(worker)
        while failure is None:
            try:
                response, fds = worker.inbox.recv()
            except (EOFError, OSError):
                break
            for fd in fds:
                os.close(fd)
            if response.request_type is RequestType.RELEASE_WRITER:
                worker.released = True  # it lives on in the pool: not gone
                return
            self._on_response(worker, response)
        self._on_worker_gone(worker, failure)

    def _await_ready(self, worker: _Worker) -> BaseException | None:
        """Wait for the writer's first answer; returns why it did not come, or None once ready.

        A writer that is still starting (importing torch on a busy machine can take minutes) is
        waited for as long as it makes progress: CPU time or bytes read. It fails at once when
        it dies or reports an error, and with WriterStartTimeoutError only after making no
        progress for subprocess_init_timeout_secs (stuck), or after _START_LIMIT_FACTOR times
        that in all."""
        stall_limit = self.config.subprocess_init_timeout_secs
        started = last_progress = time.monotonic()
        progress = _progress(worker.process.pid)
        while True:
            now = time.monotonic()
            sample = _progress(worker.process.pid)
            if sample != progress:
                progress, last_progress = sample, now
            if now - last_progress > stall_limit or now - started > stall_limit * _START_LIMIT_FACTOR:
                stuck = now - last_progress > stall_limit
                error: BaseException = WriterStartTimeoutError(
                    f"Timed out after {now - started:.0f}s waiting for checkpoint subprocess to initialize: "
                    + (
                        f"it made no progress (no CPU time, no reads) for {stall_limit:.0f} s, so it is stuck "
                        "(an init function waiting on something that never comes?)"
                        if stuck
                        else f"it was still starting after {_START_LIMIT_FACTOR} times "
                        "CheckpointProcessConfig.subprocess_init_timeout_secs"
                    )
                )
                break
            try:
                readable, _, _ = select.select([worker.inbox], [], [], 1.0)
                if not readable:
                    continue
                response, _fds = worker.inbox.recv()
            except (EOFError, OSError, ValueError):
                worker.process.join(_DEATH_GRACE_SECS)
                error = WriterStartError(
                    f"Child process terminated unexpectedly: the checkpoint writer process failed to start "
                    f"({describe_exit(worker.process.exitcode)})"
                )
                break
            if response.success:
                worker.ready.set_result(None)
                return None
            error = WriterStartError(
                "the checkpoint writer process failed to initialise (init functions must be importable "
                f"module-level functions, not defined in __main__):\n{response.error_msg}"
            )
            with self._lock:
                self._start_failure = error  # an init function that raises would raise again
            break
        worker.process.kill()
        if not worker.ready.done():
            worker.ready.set_exception(error)
        return error

    def _on_response(self, worker: _Worker, response: WorkerResponse) -> None:
        if response.request_type is RequestType.CANCEL_WRITES:
            with self._lock:
                received = worker.cancels.popleft() if worker.cancels else None
            if received is not None:
                received.set_result(None)
            return
        if response.request_type is not RequestType.WRITE_CHECKPOINT:
            return
        outcome = response.payload
        if not isinstance(outcome, WriteOutcome):
            logger.warning("checkpoint writer answered a write without its outcome; ignored: %s", response)
            return
        with self._lock:
            pending = worker.pending.pop(outcome.request_id, None)
        if pending is None:
            logger.warning("checkpoint writer answered request %d, which is not pending; ignored", outcome.request_id)
            return
        if response.success:
            _finish(pending, result=outcome.result)
        else:
            error_class = _WRITE_ERRORS_BY_NAME.get(outcome.error_type or "", CheckpointWriteError)
            error = error_class(response.error_msg)
            error.errno = outcome.error_errno
            _finish(pending, error=error)

    def _on_worker_gone(self, worker: _Worker, failure: BaseException | None) -> None:
        worker.process.join(_DEATH_GRACE_SECS)
        with self._lock:
            worker.alive = False
            orphans = list(worker.pending.values())
            worker.pending.clear()
            cancels, worker.cancels = list(worker.cancels), collections.deque()
        for received in cancels:
            received.set_result(None)  # nothing is left to cancel
        worker.inbox.close()
        if not orphans:
            return
        sweep_around([p.path for p in orphans])
        error = failure or WriterProcessDiedError(
            f"Child process terminated unexpectedly: the checkpoint writer process (pid {worker.process.pid}) "
            f"died: {describe_exit(worker.process.exitcode)}; the checkpoint was not committed (any previous "
            "checkpoint at that path is intact). The next save starts a new writer"
        )
        for pending in orphans:
            _finish(pending, error=error)

    # -- shutdown

    def close(self, timeout: float | None = None) -> None:
        """Stop the writer once it has finished the writes already handed to it; idempotent.

        Waits at most `timeout` seconds (default: subprocess_shutdown_timeout_secs) for that,
        then kills the writer; writes it had not finished then fail with WriterProcessDiedError
        (the previous checkpoint at each path is intact). In a forked child it only forgets the
        parent's writer."""
        if self._closed:
            return
        self._closed = True
        from . import drain

        drain.unregister(self)
        if os.getpid() != self._owner_pid:
            return
        limit = self.config.subprocess_shutdown_timeout_secs if timeout is None else max(timeout, 0.0)
        deadline = time.monotonic() + limit
        worker = self._worker
        releasing = self._releasable(worker)
        if worker.alive:
            farewell = RequestType.RELEASE_WRITER if releasing else RequestType.TERMINATE_PROCESS
            self._queue(_Outgoing(worker, WorkerRequest(farewell), []))
        self._outbox.put(None)
        self._sender.join(_left(deadline))
        if self._sender.is_alive():  # blocked sending to a writer that does not read (stopped, hung)
            worker.process.kill()
            worker.channel.shutdown(both=True)
            self._sender.join()
        elif releasing and worker.receiver is not None:
            worker.receiver.join(_left(deadline))
            if worker.released:
                worker.inbox.close()
                popen = worker.process.popen
                writer_pool.give(writer_pool.IdleWriter(popen, worker.channel.detach(), worker.sys_path))
                return
        worker.inbox.shutdown()
        if not self.process.join(_left(deadline)):
            logger.warning("checkpoint writer process %d did not stop in time; killing it", worker.process.pid)
            worker.process.kill()
        if worker.receiver is not None:
            worker.receiver.join()
        worker.channel.close()

    def _releasable(self, worker: _Worker) -> bool:
        """Whether the writer can serve another checkpointer: it runs only our own init functions,
        started, and has no write left (a close that gave up on writes stops it)."""
        ready = worker.ready.done() and worker.ready.exception() is None
        return self._poolable and worker.alive and ready and not worker.pending

    def drain_for_signal(self) -> None:
        """Nothing to wait for here: the checkpointer that owns this process waits for its writes."""


def _progress(pid: int) -> tuple[int, int]:
    """What a process has done so far: CPU ticks and bytes read ((0, 0) once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        with open(f"/proc/{pid}/io", "rb") as io:
            read = next((int(line.split()[1]) for line in io if line.startswith(b"rchar:")), 0)
    except (OSError, IndexError, ValueError):
        return (0, 0)
    return (ticks, read)


def _absolute(path: str) -> str:
    """`path` from this process's working directory, as spelled (`..` kept for the kernel to resolve,
    as the final rename will): the writer's own working directory never decides where a file goes."""
    return path if not path or os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _finish(pending: _Pending, result: Any = None, error: BaseException | None = None) -> None:
    pending.on_done()
    if pending.future.done():
        return
    if error is not None:
        pending.future.set_exception(error)
    else:
        pending.future.set_result(result)


def _pickled_kwargs(kwargs: dict[str, Any]) -> bytes:
    try:
        return pickle.dumps(dict(kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"the keyword arguments of this save must be picklable to reach the writer process: {exc}"
        ) from exc


def _gone(ref: weakref.ref[Slab]) -> bool:
    slab = ref()
    return slab is None or slab.closed


def _shared_fd(storage: torch.UntypedStorage) -> tuple[torch.UntypedStorage, int]:
    """`storage` in shared memory, with the descriptor that passes it: moved there in place (as
    torch.multiprocessing does) or, for memory that cannot move (CUDA, mapped files), copied."""
    if storage.device.type == "cpu":
        try:
            if not storage.is_shared():
                storage.share_memory_()
            return storage, torch_internals.share_fd(storage)
        except RuntimeError:
            pass
    shared = torch_internals.new_shared_storage(storage.nbytes())
    shared.copy_(storage)
    return shared, torch_internals.share_fd(shared)


# Writer errors that keep their type across the process boundary (others become CheckpointWriteError).
_WRITE_ERRORS_BY_NAME: dict[str, type[CheckpointWriteError]] = {
    cls.__name__: cls for cls in (BarrierTimeoutError, CheckpointCommitError)
}
