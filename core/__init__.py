"""async-ckpt core: asynchronous, atomic, verified checkpoints for PyTorch state dicts.

    from core import make_async_checkpointer
    with make_async_checkpointer() as ckpt:
        stage, write = ckpt.save("ckpt/step_100", {"model": model.state_dict(), "step": 100})
        stage.result()          # from here on the training loop may change the model
        ...
        state = ckpt.load("ckpt/step_100")

The names of torch.distributed.checkpoint._experimental are all here, so code written for it
moves over by changing its imports to `core` (see the README for the differences).
"""

from .barriers import (
    BARRIER_REGISTRY,
    Barrier,
    DistBarrier,
    TCPStoreBarrier,
    create_barrier_from_config,
    register_barrier,
)
from .builder import make_async_checkpointer, make_sync_checkpointer
from .catalog import CheckpointInfo, describe_checkpoint, find_latest, list_checkpoints, read_latest
from .checkpointer import AsyncCheckpointer, Checkpointer, SyncCheckpointer
from .commit import COMMIT_RECORD, CommitRecord, RankFile, read_commit_record
from .config import (
    BarrierConfig,
    CheckpointerConfig,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
    RetentionConfig,
)
from .convert import to_torch_save
from .errors import (
    BarrierTimeoutError,
    CheckpointCommitError,
    CheckpointConfigError,
    CheckpointerClosedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    DrainTimeoutError,
    MissingKeysError,
    NotACheckpointError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedFormatVersionError,
    UnsupportedStateError,
    WorldSizeMismatchError,
    WriterProcessDiedError,
    WriterStartError,
    WriterStartTimeoutError,
)
from .futures import wrap_future
from .options import AsyncOptions
from .outstanding import WriteFuture
from .pending import pending_writes, register_pending_write, wait_for_pending_writes
from .process import CheckpointProcess
from .protocol import RequestType, WorkerRequest, WorkerResponse
from .reader import CheckpointReader
from .staging import CheckpointStager, DefaultStager, StagedStateDict
from .types import STATE_DICT, CheckpointStats, RankInfo, WriteResult
from .writer import CheckpointWriter, WriterHook
from .writer_factory import default_subprocess_init_fn, default_writer_init_fn
from .writer_pool import prestart_writer, release_idle_writers

__async_ckpt__ = True  # marks this distribution's `core`, as opposed to a user's package of that name

__all__ = [
    "to_torch_save",
    "AsyncCheckpointer",
    "AsyncOptions",
    "BARRIER_REGISTRY",
    "Barrier",
    "BarrierConfig",
    "BarrierTimeoutError",
    "COMMIT_RECORD",
    "CheckpointCommitError",
    "CheckpointConfigError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "CheckpointReader",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointStats",
    "CheckpointWriteError",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerClosedError",
    "CheckpointerConfig",
    "CommitRecord",
    "CorruptCheckpointError",
    "DefaultStager",
    "DistBarrier",
    "DrainTimeoutError",
    "MissingKeysError",
    "NotACheckpointError",
    "RankFile",
    "RankInfo",
    "RequestType",
    "RetentionConfig",
    "STATE_DICT",
    "StagedStateDict",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "UncommittedCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedFormatVersionError",
    "UnsupportedStateError",
    "WorkerRequest",
    "WorkerResponse",
    "WorldSizeMismatchError",
    "WriteFuture",
    "WriteResult",
    "WriterHook",
    "WriterProcessDiedError",
    "WriterStartError",
    "WriterStartTimeoutError",
    "create_barrier_from_config",
    "default_subprocess_init_fn",
    "default_writer_init_fn",
    "describe_checkpoint",
    "find_latest",
    "list_checkpoints",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "pending_writes",
    "read_commit_record",
    "read_latest",
    "register_barrier",
    "register_pending_write",
    "prestart_writer",
    "release_idle_writers",
    "wait_for_pending_writes",
    "wrap_future",
]
