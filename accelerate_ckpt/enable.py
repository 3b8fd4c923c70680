"""enable_async_checkpointing: the one call a training script adds."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Protocol

from accelerate import Accelerator

from core import AsyncOptions, CheckpointerConfig, WriterHook

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
    options: AsyncOptions | None = None,
    *,
    config: CheckpointerConfig | None = None,
    commit_hook: WriterHook | None = None,
    **option_fields: Any,
) -> AsyncCheckpointingHandle:
    """Make `accelerator.save_state()` asynchronous; returns a handle with wait() and close().

    enabled: True/False, or None to read ACCELERATE_ASYNC_CHECKPOINT (on when unset or empty).
        When off, the accelerator is left untouched: Accelerate's own behaviour, byte for byte.
    options: core.AsyncOptions (max_in_flight counts whole checkpoints here), or its fields by
        name (`max_in_flight=3`); `config`, a full CheckpointerConfig, replaces them all.
    commit_hook: a picklable WriterHook run in the writer process around each file's commit.
    FSDP, DeepSpeed, Megatron-LM and XLA keep Accelerate's own save, with one warning.
    """
    chosen = dataclasses.replace(options or AsyncOptions(), **option_fields)  # invalid options raise here
    if not async_checkpointing_enabled(enabled):
        return _Disabled()
    reason = unsupported_reason(accelerator)
    if reason is not None:
        warnings.warn(
            f"async checkpointing is not supported here ({reason}); accelerator.save_state() stays synchronous",
            stacklevel=2,
        )
        return _Disabled()
    return AsyncSaveState(accelerator, chosen.config(config), commit_hook)
