"""Advisory locks on checkpoints: readers share, retention and publishing exclude.

Every load holds a shared `flock` on the checkpoint (file or directory) while it reads, so
retention never deletes what is being read; a directory checkpoint is locked exclusively while
its files and commit record are put in place, so two saves to one path never interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Hold a shared lock on the checkpoint at `path` while it is read (nothing when it is missing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield  # missing paths are reported by the reader itself
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def unless_in_use(path: str) -> Iterator[bool]:
    """Yield True with an exclusive lock on the checkpoint, or False when a reader holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the existing file or directory `path` (waits for readers)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
