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
"""

from __future__ import annotations

import _signal
import os
import signal
import threading
from types import FrameType


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
