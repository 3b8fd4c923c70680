"""Removing a file now and freeing its space in the background.

Unlinking a large file that was made durable costs milliseconds (10-25 ms for 40 MB on ext4: its
extents are freed and journalled); removing only its name costs microseconds. `remove_file`
removes the name at once, as os.remove does, while this process keeps the file open; a
background thread at low priority then closes it, and the kernel frees the blocks on that last
close. If the process exits first, the kernel closes it and frees them just the same: nothing is
left on disk.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

MAX_HELD = 64  # files held open at most; beyond that a removal frees its file itself
NICENESS = 10  # how much lower the freeing thread's priority is than its starter's


class _Freeing:
    """The unlinked files still held open, and the thread that closes them (it ends when none are
    left, and is started again by the next removal)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[int] = []
        self._running = False  # a thread is closing files and will take any handed over
        self._thread: threading.Thread | None = None  # the last one started, kept to be joined

    def hand_over(self, fd: int) -> bool:
        """Have the thread close `fd`; False when too many are held already (close it yourself)."""
        with self._lock:
            if len(self._held) >= MAX_HELD:
                return False
            self._held.append(fd)
            if not self._running:
                thread = threading.Thread(target=self._close_all, name="async-ckpt-free", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread can be started now
                    self._held.pop()
                    return False
                self._running, self._thread = True, thread
        return True

    def _close_all(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(os.nice(0) + NICENESS, 19))
        except OSError:
            logger.debug("cannot lower the freeing thread's priority")
        while True:
            with self._lock:
                if not self._held:
                    self._running = False
                    return
                fd = self._held.pop(0)
            os.close(fd)

    def wait(self) -> None:
        """Return once the thread has closed every file and ended (not only decided to end: a
        test that counts threads right after must not find it)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


_freeing = _Freeing()


def remove_file(path: str) -> None:
    """Remove the file (or symbolic link) `path`, as os.remove does: once this returns, `path` is
    gone, and a file saved there afterwards is never touched. Its space is freed by a background
    thread soon after (see the module docstring), or here when that thread holds many already."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # a symbolic link, a file this process may not read, one already gone
        os.remove(path)
        return
    try:
        os.remove(path)
    except BaseException:
        os.close(fd)
        raise
    if not _freeing.hand_over(fd):
        os.close(fd)


def wait_until_freed() -> None:
    """Return once every file removed so far by `remove_file` has been closed (its space freed)."""
    _freeing.wait()
