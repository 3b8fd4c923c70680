"""enable_async_checkpointing: the one call a training script adds."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Protocol

from accelerate import Accelerator

from core import CheckpointerConfig, WriterHook, adapter_config

from .flag import async_checkpointing_enabled
from .save_state import AsyncSaveState, unsupported_reason

logger = logging.getLogger(__name__)


class AsyncCheckpointingHandle(Protocol):
    def wait(self) -> None: ...

    def close(self) -> None: ...


class _Disabled:
    """What enable_async_checkpointing returns when the accelerator keeps its own save_state."""

    def wait(self) -> None:
        """Nothing is pending: Accelerate's own save_state() is synchronous."""

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> _Disabled:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def enable_async_checkpointing(
    accelerator: Accelerator,
    enabled: bool | None = None,
    *,
    max_in_flight: int = 2,
    pin_memory: bool | None = None,
    checksums: bool = True,
    use_direct_io: bool = True,
    io_threads: int = 0,
    incremental: bool = False,
    barrier_timeout_secs: int = 600,
    config: CheckpointerConfig | None = None,
    commit_hook: WriterHook | None = None,
) -> AsyncCheckpointingHandle:
    """Make `accelerator.save_state()` asynchronous; returns a handle with wait() and close().

    enabled: True/False, or None to read ACCELERATE_ASYNC_CHECKPOINT (on when unset or empty).
        When off, the accelerator is left untouched: Accelerate's own behaviour, byte for byte.
    max_in_flight: whole checkpoints that may be staged or writing at once (host memory is
        about that many copies of the saved state). The other options are the Lightning
        plugin's (core.adapter_config); `config` replaces them all.
    FSDP, DeepSpeed, Megatron-LM and XLA keep Accelerate's own save, with one warning.
    """
    if not async_checkpointing_enabled(enabled):
        return _Disabled()
    reason = unsupported_reason(accelerator)
    if reason is not None:
        warnings.warn(
            f"async checkpointing is not supported here ({reason}); accelerator.save_state() stays synchronous",
            stacklevel=2,
        )
        return _Disabled()
    if not isinstance(barrier_timeout_secs, int) or barrier_timeout_secs <= 0:
        raise ValueError(f"barrier_timeout_secs must be a positive int, got {barrier_timeout_secs!r}")
    config = adapter_config(
        config,
        max_in_flight=max_in_flight,
        pin_memory=pin_memory,
        checksums=checksums,
        use_direct_io=use_direct_io,
        io_threads=io_threads,
        incremental=incremental,
        barrier_timeout_secs=barrier_timeout_secs,
    )
    return AsyncSaveState(accelerator, config, commit_hook)
