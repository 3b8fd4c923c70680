"""Removals of checkpoints whose write is still pending: the training loop does not wait for them.

ModelCheckpoint removes the checkpoint a newer one superseded (`save_top_k`) right after saving
the newer one, often while the older one's write is still queued. Waiting for that write would
make every save synchronous; instead the plugin asks its writer to skip the write if it has not
started (core.AsyncCheckpointer.cancel), and the file is removed once the write is over either
way. A save to the same path issued after the removal wins: its file is never removed by it.
`wait()` returns once every removal asked for so far is done and its space freed.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
from concurrent.futures import Future
from typing import Any

from core.background_free import remove_file, wait_until_freed
from core.fsutil import resolved
from core.interrupts import InterruptSafeEvent

logger = logging.getLogger(__name__)


def remove_now(path: str, free_in_background: bool = True) -> None:
    """Remove the checkpoint file or folder `path` (a file's space freed in the background, or
    before this returns)."""
    if os.path.islink(path) or os.path.isfile(path):
        if free_in_background:
            remove_file(path)
        else:
            os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    else:
        logger.debug("remove_checkpoint: %s is already gone", path)


class DeferredRemovals:
    """See the module docstring; one per process (removals may name another plugin's saves)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saves: collections.Counter[str] = collections.Counter()  # saves issued, by resolved path
        self._outstanding: set[InterruptSafeEvent] = set()

    def saving(self, path: str) -> None:
        """A save to `path` is being issued (a removal asked for before it must not remove it)."""
        with self._lock:
            self._saves[resolved(path)] += 1

    def remove_after(self, path: str, writes: list[Future[Any]]) -> None:
        """Remove `path` once every one of `writes` is over, unless it is saved again meanwhile."""
        key = resolved(path)
        done = InterruptSafeEvent()
        with self._lock:
            generation = self._saves[key]
            remaining = [len(writes)]
            self._outstanding.add(done)

        def finished(_: Future[Any]) -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
                saved_again = self._saves[key] != generation
            try:
                if not saved_again:
                    remove_now(path)
            except OSError as exc:
                logger.warning("could not remove checkpoint %s after its write: %s", path, exc)
            finally:
                with self._lock:
                    self._outstanding.discard(done)
                done.set()

        for write in writes:
            write.add_done_callback(finished)

    def wait(self) -> None:
        with self._lock:
            outstanding = list(self._outstanding)
        for done in outstanding:
            done.wait()
        wait_until_freed()


removals = DeferredRemovals()
