"""Ctrl-C that never lands halfway through handing a save over.

A KeyboardInterrupt can be raised between any two bytecodes of the main thread. The few
statements that register a save and hand it to the writer run with SIGINT deferred: a Ctrl-C
that arrives meanwhile is raised as soon as they are done, so the caller is interrupted at once
after them, and a save is either fully handed over or not at all. Long work (the copy, waiting
for the writer) stays interruptible.

Why a handler swap, which is process-wide state: a signal's handler belongs to the process, and
Python runs it in the main thread. Blocking SIGINT with a signal mask instead would not defer
it: the kernel delivers a process's signal to any thread that does not block it (ours, torch's,
the user's), Python notes it there and the main thread raises it at its next bytecode, inside
the section. The swap lasts only for those few statements, in the main thread, and always
restores the handler that was there, then runs it for a Ctrl-C that came meanwhile.

The locks a Ctrl-C can leave held. `with` on a lock written in C (threading.Lock, RLock) takes and
releases it without running Python code in between. threading.Condition and Event, and the
Future built on them, enter and leave their lock through Python methods: a KeyboardInterrupt
raised at the first bytecode of `Condition.__exit__` (or right after `__enter__` took the lock)
leaves it held for good, and the next thread to complete that future or set that event waits
forever. The condition, event and future here keep their lock in C, so that a Ctrl-C in the main
thread while it waits for a save never leaves a lock behind. (Where CPython checks for signals
is its own choice: tests/test_interrupts.py interrupts at every such point, and says whether
this holds on the Python it runs on; Python 3.11 is the one tested.)
"""

from __future__ import annotations

import _signal
import _thread
import collections
import os
import signal
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from types import FrameType
from typing import Any


class sigint_deferred:  # (lower case: used as the function it was, `with sigint_deferred():`)
    """Defer SIGINT in the main thread for the block; a no-op in other threads.

    (A class on `_signal`, the module `signal` wraps: it runs several times per save, and the
    generator and enum conversions of the plain version cost ~20 us each time.)"""

    __slots__ = ("_previous", "_received", "_swapped")

    def __enter__(self) -> None:
        self._swapped = False
        if threading.current_thread() is not threading.main_thread():
            return  # signals are only ever handled in the main thread
        received: list[FrameType | None] = []
        try:
            self._previous = _signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
        except ValueError:  # not the main interpreter
            return
        self._received, self._swapped = received, True

    def __exit__(self, *exc_info: object) -> None:
        if self._swapped:
            _signal.signal(signal.SIGINT, self._previous)
            if self._received:
                _deliver(self._previous, self._received[0])


def _deliver(handler: signal.Handlers | object, frame: FrameType | None) -> None:
    """Run what SIGINT would have run, now."""
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)


class InterruptSafeCondition:
    """threading.Condition over an RLock, whose `with` block no Ctrl-C can leave locked: entering
    and leaving it calls the RLock's own C methods, with no Python code run while the lock is held
    between them. wait() stays interruptible."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._waiters: collections.deque[Any] = collections.deque()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        self._is_owned = self._lock._is_owned  # type: ignore[attr-defined]
        self._release_save = self._lock._release_save  # type: ignore[attr-defined]
        self._acquire_restore = self._lock._acquire_restore  # type: ignore[attr-defined]

    # `with` looks both up (running these getters) before it takes the lock; it then calls the
    # lock's C methods themselves.
    __enter__ = property(lambda self: self._lock.__enter__)
    __exit__ = property(lambda self: self._lock.__exit__)

    def wait(self, timeout: float | None = None) -> bool:
        """As Condition.wait: release the lock, wait for notify() (or `timeout`), take it again.

        The lock is given up with SIGINT deferred and taken back by a C call that nothing can
        interrupt before it runs: a Ctrl-C raised while waiting always finds it held again."""
        if not self._is_owned():
            raise RuntimeError("cannot wait on an un-acquired lock")
        waiter = _thread.allocate_lock()
        waiter.acquire()
        saved, notified = None, False
        try:
            with sigint_deferred():  # (a Ctrl-C that came meanwhile is raised on leaving, inside the try)
                self._waiters.append(waiter)
                saved = self._release_save()
            notified = waiter.acquire(True, -1 if timeout is None else timeout)
            return notified
        finally:
            if saved is not None:
                self._acquire_restore(saved)  # (a C call: no Ctrl-C is raised before it has run)
            if not notified:
                try:
                    self._waiters.remove(waiter)
                except ValueError:  # notified after all
                    pass

    def notify(self, n: int = 1) -> None:
        """Wake up to `n` waiting threads (call with the lock held)."""
        if not self._is_owned():
            raise RuntimeError("cannot notify on an un-acquired lock")
        for _ in range(min(n, len(self._waiters))):
            self._waiters.popleft().release()

    def notify_all(self) -> None:
        """Wake every waiting thread (call with the lock held)."""
        self.notify(len(self._waiters))


class InterruptSafeEvent:
    """threading.Event on an InterruptSafeCondition (see the module docstring)."""

    __slots__ = ("_condition", "_flag")

    def __init__(self) -> None:
        self._condition = InterruptSafeCondition()
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._condition:
            self._flag = True
            self._condition.notify_all()

    def clear(self) -> None:
        with self._condition:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        """True once the event is set; False if `timeout` passed first."""
        with self._condition:
            return self._flag or self._condition.wait(timeout) or self._flag


class InterruptSafeFuture(Future[Any]):
    """A concurrent.futures.Future whose lock a Ctrl-C in result() or wait() cannot leave held
    (which would block the thread that completes it, for good)."""

    def __init__(self) -> None:
        super().__init__()
        self._condition = InterruptSafeCondition()  # type: ignore[assignment]


def wait_for_futures(futures: Iterable[Future[Any]], timeout: float | None = None) -> list[Future[Any]]:
    """Wait until every future is done or `timeout` seconds have passed; the ones not done.

    concurrent.futures.wait, minus its waiter's threading.Event, which a Ctrl-C can leave locked
    (then the thread that completes a future waits for good). Interruptible."""
    futures = list(futures)
    deadline = None if timeout is None else time.monotonic() + timeout
    for future in futures:
        with future._condition:
            while not future.done():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                future._condition.wait(remaining)
    return [future for future in futures if not future.done()]
