"""Lightning adapter: ``Trainer(plugins=[AsyncCheckpointIO()])``."""

import core

if not getattr(core, "__async_ckpt__", False):  # a package of the user's, also named `core`, came first on sys.path
    raise ImportError(
        f"`import core` found {core.__file__}, not async-ckpt's core: rename your `core` package or start elsewhere"
    )

from .plugin import AsyncCheckpointIO

__all__ = ["AsyncCheckpointIO"]
