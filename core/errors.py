"""Exceptions a user of the checkpointer can meet; each says what is wrong and what to do.

Where torch's `torch.distributed.checkpoint._experimental` raises a built-in exception for the
same condition, ours subclass it (RuntimeError, TimeoutError, FileNotFoundError, AssertionError),
so code written against that module keeps catching them.
"""

from __future__ import annotations

import pickle


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


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint holds objects that weights-only loading refuses to construct."""


class UnsupportedStateError(CheckpointError, TypeError):
    """The state dict holds something that cannot be checkpointed; raised before anything is written."""


class MissingKeysError(CheckpointError, RuntimeError):
    """A strict load asked for keys the checkpoint does not hold."""


class CheckpointConfigError(CheckpointError, ValueError, AssertionError):
    """A configuration asks for something this machine or job cannot provide."""


class CheckpointWriteError(CheckpointError, RuntimeError):
    """A write failed; the message carries the writer's error (and, from the writer process, its
    traceback). `errno` is the operating system's error number when one caused it (ENOSPC...)."""

    errno: int | None = None


class WriterProcessDiedError(CheckpointWriteError):
    """The checkpoint writer process died, or could not be reached, while a write was pending."""


class WriterStartError(CheckpointWriteError):
    """The checkpoint writer process could not be started or initialised."""


class WriterStartTimeoutError(WriterStartError, TimeoutError):
    """The checkpoint writer process did not become ready within subprocess_init_timeout_secs."""


class BarrierTimeoutError(CheckpointWriteError, TimeoutError):
    """Not every rank reached the checkpoint barrier in time; the message names the missing ranks."""


class DrainTimeoutError(CheckpointWriteError, TimeoutError):
    """close() or interpreter exit gave up waiting for a write after the drain timeout."""


class CheckpointerClosedError(CheckpointError, RuntimeError):
    """The checkpointer was used after close(), or from a process it does not belong to (after fork)."""


class UncommittedCheckpointError(CheckpointNotFoundError):
    """The checkpoint directory was never committed (an interrupted or failed save): treat it as absent."""


class CheckpointCommitError(CheckpointWriteError):
    """The ranks could not agree to commit a checkpoint (a rank failed, ranks saved to different
    paths, or a concurrent save to the same path replaced a file while it was being committed)."""


class WorldSizeMismatchError(CheckpointError):
    """The checkpoint was written by a different number of ranks than the job loading it."""
