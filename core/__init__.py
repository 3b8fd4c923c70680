"""async-ckpt core: asynchronous, atomic, verified checkpoints for PyTorch state dicts.

    from core import make_async_checkpointer
    with make_async_checkpointer() as ckpt:
        stage, write = ckpt.save("ckpt/step_100", {"model": model.state_dict(), "step": 100})
        stage.result()          # from here on the training loop may change the model
        ...
        state = ckpt.load("ckpt/step_100")
"""

from .barriers import Barrier, BarrierConfig, BarrierTimeoutError, DistBarrier, TCPStoreBarrier
from .builder import make_async_checkpointer, make_sync_checkpointer
from .checkpointer import AsyncCheckpointer, Checkpointer, SyncCheckpointer
from .config import (
    RetentionConfig,
    CheckpointerConfig,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
)
from .catalog import CheckpointInfo, describe_checkpoint, find_latest, list_checkpoints, read_latest
from .commit import COMMIT_RECORD, CommitRecord, RankFile, read_commit_record
from .errors import (
    CheckpointCommitError,
    CheckpointError,
    CheckpointerClosedError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NotACheckpointError,
    UnsupportedFormatVersionError,
    UncommittedCheckpointError,
    UnsupportedStateError,
    WorldSizeMismatchError,
    WriterProcessDiedError,
)
from .process import CheckpointProcess
from .reader import CheckpointReader
from .staging import CheckpointStager, DefaultStager, StagedCheckpoint
from .types import STATE_DICT, CheckpointStats, RankInfo, WriteResult
from .writer import CheckpointWriter, WriterHook

__all__ = [
    "AsyncCheckpointer", "Barrier", "CheckpointStats", "CheckpointInfo", "RetentionConfig",
    "describe_checkpoint", "find_latest", "list_checkpoints", "read_latest", "COMMIT_RECORD", "CheckpointCommitError", "CommitRecord", "RankFile",
    "UncommittedCheckpointError", "WorldSizeMismatchError", "read_commit_record", "BarrierConfig", "BarrierTimeoutError", "CheckpointError",
    "CheckpointNotFoundError", "CheckpointProcess", "CheckpointProcessConfig", "CheckpointReader",
    "CheckpointStager", "CheckpointStagerConfig", "CheckpointWriteError", "CheckpointWriter",
    "CheckpointWriterConfig", "Checkpointer", "CheckpointerClosedError", "CheckpointerConfig",
    "CorruptCheckpointError", "DefaultStager", "DistBarrier", "NotACheckpointError", "RankInfo",
    "STATE_DICT", "StagedCheckpoint", "SyncCheckpointer", "TCPStoreBarrier",
    "UnsupportedFormatVersionError", "UnsupportedStateError", "WriteResult", "WriterHook",
    "WriterProcessDiedError", "make_async_checkpointer", "make_sync_checkpointer",
]
