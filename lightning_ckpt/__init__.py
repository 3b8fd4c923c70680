"""Lightning adapter: ``Trainer(plugins=[AsyncCheckpointIO()])``."""

from .plugin import AsyncCheckpointIO

__all__ = ["AsyncCheckpointIO"]
