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
import os
import socket
import subprocess
import threading
from dataclasses import dataclass

IDLE_SECS = 300.0  # how long a released writer waits for its next checkpointer (worker side)
MAX_IDLE = 2


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
