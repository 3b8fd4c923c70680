"""The writer process: serves write requests from its trainer until the trainer is gone.

It is a fresh interpreter (not multiprocessing's spawn), so the trainer's `__main__` module is
never re-run in it. A reader thread takes every request off the socket as it arrives, so
whatever the trainer handed over is held here even if the trainer dies right after; the main
thread writes them in order, then exits at end-of-file. When it falls behind, a queued write
whose path a newer queued write also saves is skipped (superseded: the newer one replaces it
anyway), and so is a queued write the trainer cancelled (its checkpoint was removed before it
was written); a write already started always finishes, and the writes one cancel names are
skipped all or none (once one of them was taken up, the rest of that save is written too). The
trainer handles Ctrl-C and SIGTERM; this process ignores both and finishes what it holds.
"""

from __future__ import annotations

import collections
import gc
import logging
import mmap
import os
import pickle
import queue
import signal
import socket
import threading
import traceback
from concurrent.futures import Future
from typing import Any, Protocol

import torch

from . import torch_internals
from .channel import Channel
from .plan import CheckpointPlan
from .protocol import (
    InitOutcome,
    RequestType,
    SlabSource,
    Undecodable,
    WorkerInit,
    WorkerRequest,
    WorkerResponse,
    WriteOutcome,
    WriteRequest,
)
from .rebuild import materialize
from .types import WriteResult
from .writer import CheckpointWriter
from .writer_pool import IDLE_SECS

logger = logging.getLogger(__name__)

Inbox = queue.Queue[tuple[WorkerRequest | Undecodable, list[int]] | None]
Item = tuple[WorkerRequest | Undecodable, list[int]]


class WriterOfTorchShape(Protocol):
    """What a writer init function may return instead of a CheckpointWriter (torch's shape)."""

    def write(self, path: str, state_dict: Any, **kwargs: Any) -> Any: ...

    def close(self) -> None: ...


def worker_main(fd: int) -> None:
    """Entry point of the writer process: serve the trainer on the socket `fd`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=fd))
    inbox: Inbox = queue.Queue()
    cancelled = Cancels()
    reader = threading.Thread(target=_read_all, args=(channel, inbox, cancelled), name="async-ckpt-inbox", daemon=True)
    reader.start()
    first = inbox.get()
    while first is not None:
        writer = _init_writer(channel, first[0])
        if writer is None:
            return
        # torch's and the writer's own objects live as long as this process: the collector's full
        # passes, which every few hundred saves' allocations start, need not walk them each time.
        gc.freeze()
        try:
            init = first[0].payload if isinstance(first[0], WorkerRequest) else None
            alone = isinstance(init, WorkerInit) and init.rank_info.global_world_size == 1
            released = _serve(channel, inbox, cancelled if alone else None, writer)
        finally:
            writer.close()
        if not released:
            return
        # Released into the trainer's pool: wait for its next checkpointer's init, or go.
        _reply(channel, WorkerResponse(RequestType.RELEASE_WRITER, True))
        try:
            first = inbox.get(timeout=IDLE_SECS)
        except queue.Empty:
            return


class Cancels:
    """The writes the trainer cancelled, in groups, one per cancel request (the files of one save,
    say): a group is skipped whole, or written whole when the main thread had taken up one of its
    writes before the request arrived."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = -1  # the id of the last write the main thread took up (ids rise in order)
        self._skipped: set[int] = set()  # writes not taken up yet that are to be skipped

    def add(self, request_ids: tuple[int, ...]) -> None:
        """(The reader thread.) Cancel these writes, unless one of them has been taken up."""
        with self._lock:
            if all(i > self._taken for i in request_ids):
                self._skipped.update(request_ids)

    def take(self, request_id: int) -> bool:
        """(The main thread, for every write in order.) Whether to skip this write."""
        with self._lock:
            self._taken = request_id
            if request_id in self._skipped:
                self._skipped.discard(request_id)
                return True
            return False


def _read_all(channel: Channel, inbox: Inbox, cancelled: Cancels) -> None:
    while True:
        try:
            data, fds = channel.recv_pickle()
        except (EOFError, OSError):
            inbox.put(None)  # the trainer is gone or done: finish what is queued, then exit
            return
        try:
            request = pickle.loads(data)
        except Exception:
            inbox.put((Undecodable(traceback.format_exc()), fds))
            continue
        if isinstance(request, WorkerRequest) and isinstance(request.payload, tuple):  # CANCEL_WRITES
            cancelled.add(request.payload)  # seen by the main thread before it starts those writes
            _reply(channel, WorkerResponse(RequestType.CANCEL_WRITES, True))  # every earlier request is held
            continue
        inbox.put((request, fds))


_replying = threading.Lock()  # the main thread and the reader thread both answer


def _reply(channel: Channel, response: WorkerResponse) -> None:
    try:
        with _replying:
            channel.send(response)
    except OSError:
        logger.debug("the trainer is gone; %s not reported", response.request_type.value)


def _init_writer(channel: Channel, request: WorkerRequest | Undecodable) -> WriterOfTorchShape | None:
    if isinstance(request, Undecodable):
        message = (
            "the writer process cannot unpickle its init functions or their arguments (a function or class "
            f"defined in the training script's __main__ cannot be imported by another process):\n{request.error}"
        )
        _reply(channel, WorkerResponse(RequestType.PING, False, message, InitOutcome(error_type="UnpicklingError")))
        return None
    init = request.payload
    if not isinstance(init, WorkerInit):
        _reply(channel, WorkerResponse(RequestType.PING, False, f"the first request must initialise, got {request}"))
        return None
    _set_niceness(init.niceness)
    try:
        if init.cwd is not None:
            os.chdir(init.cwd)
            os.environ.clear()
            os.environ.update(init.environ)
        init.subprocess_init_fn(*init.subprocess_init_args)
        args = dict(init.writer_init_args)
        args.setdefault("rank_info", init.rank_info)
        writer: WriterOfTorchShape = init.writer_init_fn(**args)
    except BaseException as exc:
        outcome = InitOutcome(error_type=type(exc).__name__)
        _reply(channel, WorkerResponse(RequestType.PING, False, traceback.format_exc(), outcome))
        return None
    _reply(channel, WorkerResponse(RequestType.PING, True, None, InitOutcome(pid=os.getpid())))
    return writer


def _set_niceness(niceness: int) -> None:
    """Every thread's priority: `niceness` below the trainer's (a writer from the pool may have
    started with another; lowering it back needs privileges, so it may stay lower). Linux keeps
    a priority per thread: the threads already running are set one by one."""
    trainer = os.getpriority(os.PRIO_PROCESS, os.getppid())
    threads = [int(tid) for tid in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for thread in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(trainer + niceness, 19))
        except PermissionError:
            logger.debug("cannot raise the writer's priority back to niceness %d", niceness)
        except ProcessLookupError:
            pass  # a thread that has ended since


def _serve(channel: Channel, inbox: Inbox, cancelled: Cancels | None, writer: WriterOfTorchShape) -> bool:
    """Write what the trainer sends until it is done; True when it released this process for
    another checkpointer, False when it stopped it or is gone. `cancelled`: None where writes
    are never skipped (several ranks: every rank must make each save, or the others wait)."""
    slabs: dict[str, MappedSlab] = {}
    queued = _Queued()
    while True:
        queued.take_arrived(inbox)
        item = queued.popleft()
        if item is None:
            return False
        request, fds = item
        if isinstance(request, Undecodable):  # only our own types cross outside a write's kwargs
            logger.error("the checkpoint writer received a message it cannot read:\n%s", request.error)
            _close_all(fds)
            continue
        if request.request_type is RequestType.TERMINATE_PROCESS:
            _reply(channel, WorkerResponse(RequestType.TERMINATE_PROCESS, True))
            return False
        if request.request_type is RequestType.RELEASE_WRITER:
            return True
        if request.request_type is RequestType.WRITE_CHECKPOINT and isinstance(request.payload, WriteRequest):
            write = request.payload
            skipped = None if cancelled is None else _skipped(write, cancelled, queued)
            if skipped is not None:
                _storage_bytes(write, fds, slabs)  # (its slab may be attached with it, for the writes after it)
                outcome = WriteOutcome(write.request_id, skipped)
                _reply(channel, WorkerResponse(RequestType.WRITE_CHECKPOINT, True, None, outcome))
            else:
                _reply(channel, _write(writer, write, fds, slabs))
        else:
            _close_all(fds)
            _reply(channel, WorkerResponse(request.request_type, False, f"unknown request {request.request_type!r}"))


class _Queued:
    """The requests taken off the socket and not yet served, in order (None: the end), with how
    many queued writes go to each path: whether a newer write of a path is queued is known at
    once, however far behind the writer is."""

    def __init__(self) -> None:
        self._items: collections.deque[Item | None] = collections.deque()
        self._writes_to: collections.Counter[str] = collections.Counter()

    def take_arrived(self, inbox: Inbox) -> None:
        """Queue every request that has arrived, waiting for one when none is queued."""
        if not self._items:
            self._append(inbox.get())
        while self._items[-1] is not None:
            try:
                self._append(inbox.get_nowait())
            except queue.Empty:
                return

    def popleft(self) -> Item | None:
        item = self._items.popleft()
        path = _write_path(item)
        if path is not None:
            self._writes_to[path] -= 1
            if not self._writes_to[path]:
                del self._writes_to[path]
        return item

    def has_write_to(self, path: str) -> bool:
        return path in self._writes_to

    def _append(self, item: Item | None) -> None:
        self._items.append(item)
        path = _write_path(item)
        if path is not None:
            self._writes_to[path] += 1


def _write_path(item: Item | None) -> str | None:
    request = item[0] if item is not None else None
    if isinstance(request, WorkerRequest) and isinstance(request.payload, WriteRequest):
        return request.payload.path
    return None


def _skipped(write: WriteRequest, cancelled: Cancels, queued: _Queued) -> WriteResult | None:
    """The result of a write not to be made (cancelled, or superseded by a newer queued write of
    the same path), or None: write it."""
    if cancelled.take(write.request_id):
        return WriteResult(write.path, (), 0, 0.0, cancelled=True)
    if queued.has_write_to(write.path):
        return WriteResult(write.path, (), 0, 0.0, superseded=True)
    return None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _write(
    writer: WriterOfTorchShape, write: WriteRequest, fds: list[int], slabs: dict[str, MappedSlab]
) -> WorkerResponse:
    try:
        storage_bytes = _storage_bytes(write, fds, slabs)
        result = _call_writer(writer, write, storage_bytes, write.kwargs)
        if isinstance(result, Future):  # torch's CheckpointWriter.write may return one
            result = result.result()
        # Only our own result type is sent back; anything else may not pickle.
        outcome = WriteOutcome(write.request_id, result if isinstance(result, WriteResult) else None)
        return WorkerResponse(RequestType.WRITE_CHECKPOINT, True, None, outcome)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}\n\nWriter traceback:\n{traceback.format_exc()}"
        failed = WriteOutcome(write.request_id, error_type=type(exc).__name__, error_errno=getattr(exc, "errno", None))
        return WorkerResponse(RequestType.WRITE_CHECKPOINT, False, message, failed)


class MappedSlab:
    """A trainer's staging slab, mapped here, and the byte views of the last plan written from it
    (the next save of that plan finds them made: thousands of storages cost milliseconds)."""

    def __init__(self, fd: int, nbytes: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as f:
            self.mapped = mmap.mmap(f.fileno(), nbytes)
        self._views: tuple[tuple[Any, ...], list[torch.Tensor]] | None = None

    def views(self, plan: CheckpointPlan) -> list[torch.Tensor]:
        """A uint8 tensor over each of the plan's storages in this slab."""
        shape = plan.slab_shape
        if self._views is None or self._views[0] != shape:
            self._views = (shape, [_region(self.mapped, s.slab_offset, s.nbytes) for s in plan.storages])
        return self._views[1]


def _storage_bytes(write: WriteRequest, fds: list[int], slabs: dict[str, MappedSlab]) -> list[torch.Tensor]:
    """A uint8 tensor over each storage of the plan, aliasing the trainer's staged bytes. First
    unmaps the slabs the trainer has closed since its last request (`forget`): a skipped write
    must do so too, or their mappings and descriptors pile up here."""
    for slab_id in write.forget:
        slabs.pop(slab_id, None)
    source = write.source
    if isinstance(source, SlabSource):
        if source.attach:
            slabs[source.slab_id] = MappedSlab(fds[0], source.nbytes)
        return slabs[source.slab_id].views(write.plan)
    try:
        shared = [torch_internals.storage_from_shared_fd(fd, nbytes) for fd, nbytes in zip(fds, source.nbytes)]
        return [torch.empty(0, dtype=torch.uint8).set_(storage) for storage in shared]
    finally:
        _close_all(fds)


def _region(mapped: mmap.mmap, offset: int, nbytes: int) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset)


def _call_writer(
    writer: WriterOfTorchShape, write: WriteRequest, storage_bytes: list[torch.Tensor], kwargs: dict[str, Any]
) -> Any:
    """CheckpointWriter writes straight from the plan; a writer that brings its own write() gets
    the state dict, rebuilt on the staged bytes, as torch's _experimental writer would."""
    if isinstance(writer, CheckpointWriter) and type(writer).write is CheckpointWriter.write:
        return writer.write_staged(write.path, write.plan, storage_bytes, options=write.options, **kwargs)
    state_dict = materialize(write.plan, [data.untyped_storage() for data in storage_bytes])
    return writer.write(path=write.path, state_dict=state_dict, **kwargs)
