"""Every pending write, by resolved path, for whoever wants to read it: in this process and across
the processes of a job.

An asynchronous save is invisible until it commits. Every checkpointer, Lightning plugin and
Accelerate hook of the process registers its pending writes here, so that any load through
async-ckpt, and any removal, first waits for a write to that path or to a path under it,
however the path is spelled (relative, absolute, through a symlink, with `..`).

Other processes cannot see this process's futures, so a pending write also leaves a marker file
beside its target (`.async_ckpt_saving.<hash of the name>-<owner>`, see leftovers.py) until it
finishes. A load in another process (rank 1 loading what rank 0 just saved, as Fabric jobs do)
waits while a marker of a live process is there. Markers of dead processes of this machine are
ignored (and swept); those of other machines count while they are younger than this process
(a job's ranks start together), for at most `_FOREIGN_MARKER_WAIT_SECS`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

import xxhash

from .fsutil import resolved
from .interrupts import wait_for_futures
from .leftovers import MARKER_PREFIX, PENDING_DIR, TEMPORARY_PREFIX, owner_alive, owner_token, process_started_at

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_pending: dict[str, list[Future[Any]]] = {}
_FOREIGN_MARKER_WAIT_SECS = 600.0
_POLL_SECS = 0.02


def register_pending_write(path: str | os.PathLike[str], future: Future[Any]) -> str | None:
    """Know `future` as a write to `path` until it completes (successfully or not), in this
    process and, in a job of several processes, in every other through a marker file (placed
    where the folder exists). Returns the marker's path: the caller may remove it with
    `remove_marker` just before completing the future, so that no waiter wakes before it is
    gone; it is removed when the future completes otherwise."""
    key = resolved(path)
    with _lock:
        _pending.setdefault(key, []).append(future)
    marker = _place_marker(key) if _other_processes_may_read() else None

    def forget(done: Future[Any]) -> None:
        with _lock:
            futures = _pending.get(key, [])
            if done in futures:
                futures.remove(done)
            if not futures:
                _pending.pop(key, None)
        remove_marker(marker)

    future.add_done_callback(forget)
    return marker


def remove_marker(marker: str | None) -> None:
    """Remove a pending write's marker (idempotent)."""
    if marker is not None:
        try:
            os.unlink(marker)
        except FileNotFoundError:
            pass  # removed already, or its folder was deleted (a cancelled save)


def pending_writes(path: str | os.PathLike[str], *, holding_it: bool = True) -> list[Future[Any]]:
    """This process's pending writes to `path`, to a path under it, or (unless not `holding_it`)
    to a checkpoint directory holding it."""
    key = resolved(path)
    with _lock:
        return [
            future
            for pending, futures in _pending.items()
            if pending == key or pending.startswith(key + os.sep) or (holding_it and key.startswith(pending + os.sep))
            for future in futures
        ]


def wait_for_pending_writes(path: str | os.PathLike[str], timeout: float | None = None) -> bool:
    """Block until every pending write to `path` (as `pending_writes` names them, and those other
    processes marked) has finished: committed or failed, a failure being reported by its own
    checkpointer, not here. False if `timeout` passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    futures = pending_writes(path)
    if futures and wait_for_futures(futures, timeout):
        return False
    return _wait_for_markers(resolved(path), deadline)


def _marker_name(key: str) -> str:
    return f"{MARKER_PREFIX}{xxhash.xxh3_64_hexdigest(os.path.basename(key).encode())}-"


def _other_processes_may_read() -> bool:
    """Whether this process is one of several of a job (a process group of more than one rank)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _place_marker(key: str) -> str | None:
    """A marker of this process beside `key`, or None where its folder does not exist yet or is
    a private folder of ours (a staging or temporary folder: nobody else reads there)."""
    if any(part == PENDING_DIR or part.startswith(TEMPORARY_PREFIX) for part in key.split(os.sep)):
        return None
    marker = os.path.join(os.path.dirname(key), _marker_name(key) + owner_token())
    try:
        fd = os.open(marker, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError:
        return None  # no folder yet (it is made by the write), or not ours to write: in-process only
    os.close(fd)
    return marker


def _markers_for(key: str) -> list[str]:
    """Markers of saves to `key`, to the checkpoint folder holding it, or to anything inside it."""
    found = []
    for target in (key, os.path.dirname(key)):
        folder, prefix = os.path.dirname(target), _marker_name(target)
        found += [os.path.join(folder, name) for name in _listing(folder) if name.startswith(prefix)]
    found += [os.path.join(key, name) for name in _listing(key) if name.startswith(MARKER_PREFIX)]
    own = owner_token()
    return [marker for marker in found if not marker.endswith(own)]


def _waiting_for(marker: str) -> bool:
    """Whether a marker still stands for a write in progress in another process."""
    alive = owner_alive(os.path.basename(marker))
    if alive is not None:
        return alive
    try:  # another machine's: only a write that began after this process did is one of this job's
        return os.stat(marker).st_mtime >= process_started_at() - 60
    except FileNotFoundError:
        return False


def _wait_for_markers(key: str, deadline: float | None) -> bool:
    started = time.monotonic()
    while True:
        markers = [marker for marker in _markers_for(key) if _waiting_for(marker)]
        if not markers:
            return True
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        if now - started > _FOREIGN_MARKER_WAIT_SECS:
            logger.warning("gave up waiting for the writes marked by %s; loading what is there", markers)
            return True
        time.sleep(_POLL_SECS)


def _listing(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []
