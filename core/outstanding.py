"""The writes a checkpointer has issued and not yet seen finish, and the failures nobody has seen.

Every write is known process-wide by its path (see pending.py) while it runs. A failure is
raised once by the owner's next save, wait or close, unless the caller already looked at it
on the write's future.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from .errors import DrainTimeoutError
from .interrupts import InterruptSafeFuture, sigint_deferred, wait_for_futures
from .pending import register_pending_write, remove_marker

logger = logging.getLogger(__name__)


class WriteFuture(InterruptSafeFuture):
    """A save's write future; it knows whether anyone has looked at its outcome, so that a
    failure the caller has already seen on the future is not raised again by save/wait/close.
    Its marker for other processes (see pending.py) is gone before anyone waiting wakes."""

    observed = False
    handed_over = False  # the save's state reached the writer: from here the write completes on its own
    marker: str | None = None

    def set_result(self, result: Any) -> None:
        remove_marker(self.marker)
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        remove_marker(self.marker)
        super().set_exception(exception)

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            self.observed = self.observed or self.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = super().exception(timeout)
        self.observed = True
        return error


def settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete `future` unless something (a drain that gave up) already has."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


@dataclass
class _Write:
    path: str
    report_errors: bool


class OutstandingWrites:
    """Tracks one owner's writes; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writes: dict[Future[Any], _Write] = {}
        self._failed: list[WriteFuture] = []

    def start(self, path: str, report_errors: bool = True) -> WriteFuture:
        """A new write future for `path`, tracked until it completes."""
        future = WriteFuture()
        with sigint_deferred():
            with self._lock:
                self._writes[future] = _Write(path, report_errors)
            future.add_done_callback(self._finished)
            future.marker = register_pending_write(path, future)
        return future  # callers defer SIGINT around this call too, so that they hold the future

    def _finished(self, future: Future[Any]) -> None:
        with self._lock:
            write = self._writes.pop(future, None)
            error = future._exception  # not exception(): that counts as looking
            if write is not None and write.report_errors and isinstance(error, Exception):
                self._failed.append(future)  # type: ignore[arg-type]

    def raise_unseen(self) -> None:
        """Raise the first failure nobody has looked at on its future (each is raised once)."""
        with self._lock:
            unseen = [f for f in self._failed if not f.observed]
            self._failed = []
        if unseen:
            raise unseen[0].exception()  # type: ignore[misc]

    def futures(self) -> list[Future[Any]]:
        with self._lock:
            return list(self._writes)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every tracked write has finished; False if `timeout` passed first."""
        return not wait_for_futures(self.futures(), timeout)

    def wait_for_signal(self, timeout: float) -> None:
        """wait(), from a signal handler: without the lock, which the interrupted code may hold."""
        for _ in range(100):
            try:
                pending = list(self._writes)
                break
            except RuntimeError:  # changed size during iteration: another thread finished a write
                continue
        else:
            return
        if pending and timeout > 0:
            logger.warning("SIGTERM: waiting up to %.0f s for %d checkpoint write(s)", timeout, len(pending))
            not_done = wait_for_futures(pending, timeout)
            if not_done:
                logger.error("SIGTERM: %d checkpoint write(s) did not finish in time", len(not_done))

    def give_up_after(self, timeout: float) -> bool:
        """Wait up to `timeout`; fail what is still running with DrainTimeoutError naming its path.
        Returns whether everything finished in time."""
        with self._lock:
            writes = dict(self._writes)
        not_done = wait_for_futures(writes, timeout)
        if not not_done:
            return True
        paths = sorted(writes[f].path for f in not_done)
        logger.error(
            "gave up after %.0f s waiting for checkpoint write(s) to %s; they are not committed", timeout, paths
        )
        for future in not_done:
            settle(
                future,
                error=DrainTimeoutError(
                    f"gave up waiting for the checkpoint write to {writes[future].path!r} after {timeout:.0f} s "
                    "(CheckpointProcessConfig.drain_timeout_secs); it was not committed"
                ),
            )
        return False
