"""Exceptions a user of the checkpointer can meet; each says what is wrong and what to do."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by async-ckpt."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path holds no checkpoint."""


class NotACheckpointError(CheckpointError, ValueError):
    """The file exists but is not a PyTorch checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """The file is a checkpoint but its bytes are damaged (truncated, flipped, missing records)."""


class UnsupportedFormatVersionError(CheckpointError):
    """The checkpoint was written by a newer async-ckpt format than this reader knows."""


class UnsupportedStateError(CheckpointError, TypeError):
    """The state dict holds something that cannot be checkpointed; raised before anything is written."""


class CheckpointWriteError(CheckpointError):
    """A background write failed; the message carries the writer's error and traceback."""


class WriterProcessDiedError(CheckpointWriteError):
    """The checkpoint writer process died while a write was pending."""


class BarrierTimeoutError(CheckpointWriteError, TimeoutError):
    """Not every rank reached the checkpoint barrier in time; the message names the missing ranks."""


class CheckpointerClosedError(CheckpointError, RuntimeError):
    """The checkpointer was used after close()."""


class UncommittedCheckpointError(CheckpointNotFoundError):
    """The checkpoint directory was never committed (an interrupted or failed save): treat it as absent."""


class CheckpointCommitError(CheckpointWriteError):
    """The ranks could not agree to commit a checkpoint (a rank failed, or ranks saved to different paths)."""


class WorldSizeMismatchError(CheckpointError):
    """The checkpoint was written by a different number of ranks than the job loading it."""
