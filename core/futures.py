"""wrap_future, as torch's _experimental module has it."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from .interrupts import InterruptSafeFuture


def wrap_future(original_result: Any) -> Future[None]:
    """A future that completes with None when `original_result` (a future) does, or fails with
    its exception; a completed one when `original_result` is not a future."""
    masked: Future[None] = InterruptSafeFuture()
    if isinstance(original_result, Future):

        def on_complete(done: Future[Any]) -> None:
            error = done.exception()
            if error is not None:
                masked.set_exception(error)
            else:
                masked.set_result(None)

        original_result.add_done_callback(on_complete)
    else:
        masked.set_result(None)
    return masked
