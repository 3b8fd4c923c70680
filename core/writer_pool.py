"""Idle writer processes, kept for the next checkpointer of this process.

Starting a writer is starting a fresh interpreter that imports torch: one to several seconds,
paid by every checkpointer, every Lightning `fit` and every Accelerate training run. When a
checkpointer whose writer runs only async-ckpt's own init functions closes, its writer is
released instead of stopped: it closes its CheckpointWriter and waits for the next checkpointer
of this process to send it a new configuration. A released writer exits by itself after
`IDLE_SECS` without one, when this process exits, or when `release_idle_writers()` is called.
At most `MAX_IDLE` wait at once.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

from .config import CheckpointProcessConfig

logger = logging.getLogger(__name__)

IDLE_SECS = 300.0  # how long a released writer waits for its next checkpointer (worker side)
MAX_IDLE = 2
SEND_BUFFER_BYTES = 8 << 20

_DISTRIBUTION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER_BOOTSTRAP = (
    "import json, os, sys; os.nice(int(os.environ.pop('ASYNC_CKPT_WORKER_NICE', '0'))); "
    "hasattr(os, 'SCHED_BATCH') and os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)); "
    "root, path = json.loads(os.environ.pop('ASYNC_CKPT_WORKER_PATH')); "
    "sys.path[:0] = [root] + [p for p in path if p != root]; "
    "import core.worker; core.worker.worker_main(int(sys.argv[1]))"
)


@dataclass
class IdleWriter:
    """A released writer process and the socket to it; `sys_path` is what it was started with
    (a later checkpointer's init functions must be importable by the same path)."""

    popen: subprocess.Popen[bytes]
    sock: socket.socket
    sys_path: tuple[str, ...]


_lock = threading.Lock()
_idle: list[IdleWriter] = []
_owner_pid = os.getpid()


def spawn(sys_path: tuple[str, ...], niceness: int) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A new writer process (a fresh interpreter: never a fork of the trainer) and the socket to
    it; it imports torch, then waits for its first checkpointer's init on that socket."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Room for the requests of a writer still importing torch (the kernel caps it at wmem_max).
    parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    with child:
        env = {
            **os.environ,
            "ASYNC_CKPT_WORKER_PATH": json.dumps([_DISTRIBUTION_ROOT, list(sys_path)]),
            "ASYNC_CKPT_WORKER_NICE": str(niceness),
        }
        popen = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOTSTRAP, str(child.fileno())], pass_fds=(child.fileno(),), env=env
        )
    return popen, parent


def prestart_writer(niceness: int = CheckpointProcessConfig.writer_niceness) -> None:
    """Start a writer now, in the background, for the first checkpointer of this process to take.

    Starting one means importing torch in a fresh interpreter (one to several seconds of CPU);
    started while the job builds its model and loads its data, it is ready when the first save
    comes, instead of competing with the first training steps. Does nothing when an idle writer
    for this sys.path is waiting already, or the pool is full. The adapters call it when they are
    created (on global rank 0 only, the rank that writes under DDP); a writer nobody takes exits
    with this process."""
    sys_path = tuple(sys.path)
    with _lock:
        if os.getpid() != _owner_pid or len(_idle) >= MAX_IDLE:
            return
        if any(writer.sys_path == sys_path and writer.popen.poll() is None for writer in _idle):
            return
        try:
            popen, sock = spawn(sys_path, niceness)
        except OSError as exc:  # the first checkpointer starts its own, and reports what fails then
            logger.debug("could not start a writer ahead of time: %s", exc)
            return
        _idle.append(IdleWriter(popen, sock, sys_path))


def take(sys_path: tuple[str, ...]) -> IdleWriter | None:
    """An idle writer started with `sys_path`, still running, or None."""
    with _lock:
        if os.getpid() != _owner_pid:
            return None
        for writer in reversed(_idle):
            if writer.sys_path == sys_path and writer.popen.poll() is None:
                _idle.remove(writer)
                return writer
        stale = [writer for writer in _idle if writer.popen.poll() is not None]
        for writer in stale:
            _idle.remove(writer)
    for writer in stale:
        _stop(writer)
    return None


def give(writer: IdleWriter) -> None:
    """Keep a released writer for the next checkpointer, or stop it when enough are kept."""
    with _lock:
        if os.getpid() == _owner_pid and len(_idle) < MAX_IDLE:
            _idle.append(writer)
            return
    _stop(writer)


def idle_writer_pids() -> set[int]:
    """The pids of the writers waiting in the pool."""
    with _lock:
        return {writer.popen.pid for writer in _idle}


def release_idle_writers(timeout: float = 10.0) -> None:
    """Stop every idle writer now (each exits at the end of its socket; killed after `timeout`)."""
    global _idle
    with _lock:
        if os.getpid() != _owner_pid:
            return
        writers, _idle = _idle, []
    for writer in writers:
        _stop(writer, timeout)


def _stop(writer: IdleWriter, timeout: float = 10.0) -> None:
    writer.sock.close()
    try:
        writer.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        writer.popen.kill()
        writer.popen.wait()


def _forget_in_forked_child() -> None:
    """A forked child does not own its parent's writers: it must neither use nor stop them."""
    global _idle, _owner_pid
    _idle, _owner_pid = [], os.getpid()


os.register_at_fork(after_in_child=_forget_in_forked_child)
atexit.register(release_idle_writers)
