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

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only ever handled in the main thread
        return
    received: list[FrameType | None] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            _deliver(previous, received[0])


def _deliver(handler: signal.Handlers | object, frame: FrameType | None) -> None:
    """Run what SIGINT would have run, now."""
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)
