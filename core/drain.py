"""Pending checkpoints are finished before the process goes: at interpreter exit and on SIGTERM.

Objects with background saves register here. At interpreter exit each is closed (which drains
it). On SIGTERM (preemption) each gets a bounded wait for its pending saves, then the handler
that was installed before runs: the user's, Lightning's, or the default (exit).

Process-wide by nature: interpreter exit and a signal's handler belong to the process. The
SIGTERM handler is installed once, by the first checkpointer that drains on SIGTERM, from the
main thread; it chains to the handler it found, so the user's or the framework's still runs.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Drainable(Protocol):
    def close(self) -> None:
        """Finish every pending save and release resources."""

    def drain_for_signal(self) -> None:
        """Wait, within the object's own deadline and without taking locks, for pending saves."""


_registered: weakref.WeakSet[Any] = weakref.WeakSet()
_previous_sigterm: Any = None
_sigterm_installed = False


def _forget_in_forked_child() -> None:
    """A forked child does not own its parent's checkpointers: it must not drain or close them."""
    _registered.clear()


os.register_at_fork(after_in_child=_forget_in_forked_child)


def register(obj: Drainable, drain_on_sigterm: bool = True) -> None:
    _registered.add(obj)
    if drain_on_sigterm:
        _install_sigterm_handler()


def unregister(obj: Drainable) -> None:
    _registered.discard(obj)


@atexit.register
def _close_all() -> None:
    for obj in list(_registered):
        try:
            obj.close()
        except Exception:
            logger.exception("a checkpoint failed while draining at interpreter exit")


def _install_sigterm_handler() -> None:
    global _previous_sigterm, _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _previous_sigterm = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def _on_sigterm(signum: int, frame: Any) -> None:
    for obj in list(_registered):
        obj.drain_for_signal()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
