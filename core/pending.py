"""Every pending write of this process, by resolved path, for whoever wants to read it.

An asynchronous save is invisible until it commits. Every checkpointer, Lightning plugin and
Accelerate hook of the process registers its pending writes here, so that any load through
async-ckpt, and any removal, first waits for a write to that path or to a path under it,
however the path is spelled (relative, absolute, through a symlink, with `..`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

from .fsutil import resolved

_lock = threading.Lock()
_pending: dict[str, list[Future]] = {}


def register_pending_write(path: str | os.PathLike[str], future: Future) -> None:
    """Know `future` as a write to `path` until it completes (successfully or not)."""
    key = resolved(path)
    with _lock:
        _pending.setdefault(key, []).append(future)

    def forget(done: Future) -> None:
        with _lock:
            futures = _pending.get(key, [])
            if done in futures:
                futures.remove(done)
            if not futures:
                _pending.pop(key, None)

    future.add_done_callback(forget)


def pending_writes(path: str | os.PathLike[str]) -> list[Future]:
    """The pending writes to `path`, to a path under it, or to a checkpoint directory holding it."""
    key = resolved(path)
    with _lock:
        return [
            future
            for pending, futures in _pending.items()
            if pending == key or pending.startswith(key + os.sep) or key.startswith(pending + os.sep)
            for future in futures
        ]


def wait_for_pending_writes(path: str | os.PathLike[str], timeout: float | None = None) -> bool:
    """Block until every pending write `pending_writes(path)` names has finished (committed or
    failed; a failure is reported by its own checkpointer, not here). False if `timeout` passed first."""
    futures = pending_writes(path)
    if not futures:
        return True
    _, not_done = wait_futures(futures, timeout=timeout)
    return not not_done
