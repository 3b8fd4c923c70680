"""Accelerate adapter: an asynchronous accelerator.save_state(), switched on by a flag.

from accelerate_ckpt import enable_async_checkpointing
handle = enable_async_checkpointing(accelerator)   # on unless ACCELERATE_ASYNC_CHECKPOINT=0
...
accelerator.save_state()                           # returns after the snapshot
"""

import core

if not getattr(core, "__async_ckpt__", False):  # a package of the user's, also named `core`, came first on sys.path
    raise ImportError(
        f"`import core` found {core.__file__}, not async-ckpt's core: rename your `core` package or start elsewhere"
    )

from .enable import AsyncCheckpointingHandle, enable_async_checkpointing
from .flag import ENV_FLAG, async_checkpointing_enabled

__all__ = ["ENV_FLAG", "AsyncCheckpointingHandle", "async_checkpointing_enabled", "enable_async_checkpointing"]
