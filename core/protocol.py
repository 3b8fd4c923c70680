"""What crosses the socket between the trainer and its writer process.

Every message is a WorkerRequest (trainer to writer) or a WorkerResponse (writer to trainer),
named as in torch's `_experimental` checkpoint process; each carries one typed payload. Tensor
bytes never cross: a write names either a staging slab (mapped once by the writer from a
descriptor sent with its first use) or one shared-memory descriptor per storage, and carries
only the plan.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .plan import CheckpointPlan
from .types import RankInfo, WriteResult


class RequestType(Enum):
    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"
    TERMINATE_PROCESS = "exit"
    RELEASE_WRITER = "release"  # close the writer, then wait for the next init (see writer_pool.py)
    CANCEL_WRITES = "cancel"  # payload: request ids whose writes are not wanted any more (no answer)


@dataclass(frozen=True)
class WorkerInit:
    """The first request's payload: how the writer process builds its writer, and the trainer's
    environment and working directory, which the writer adopts (a writer from the pool was
    started earlier, perhaps before MASTER_PORT was set or the trainer changed directory)."""

    rank_info: RankInfo
    subprocess_init_fn: Callable[..., None]
    subprocess_init_args: tuple[Any, ...]
    writer_init_fn: Callable[..., Any]
    writer_init_args: dict[str, Any]
    environ: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    niceness: int = 0  # the writer's priority below the trainer's (CheckpointProcessConfig.writer_niceness)


@dataclass(frozen=True)
class InitOutcome:
    """The answer to WorkerInit: the writer's pid once it is ready, or the failure's type."""

    pid: int | None = None
    error_type: str | None = None


@dataclass(frozen=True)
class SlabSource:
    """The bytes are in staging slab `slab_id`; its descriptor comes with the request when `attach`."""

    slab_id: str
    nbytes: int
    attach: bool


@dataclass(frozen=True)
class SharedSource:
    """The bytes are in shared-memory storages, one descriptor per storage, sent with the request."""

    nbytes: tuple[int, ...]


@dataclass(frozen=True)
class WriteOptions:
    """How the writer treats one write, beyond the file's content.

    link_from: the path of a checkpoint this writer committed from the same bytes; while it is
        still that file, the new file shares its extents or is a hard link to it (dedupe_key).
    create_folder: create the checkpoint's folder when it is missing; False fails the write
        instead (a folder deleted while its save ran stays deleted).
    extra_files: (name, content) of files rank 0 writes into a sharded checkpoint's directory
        before its commit, which records their digests (Lightning's meta.pt).
    private_folder: the file's folder is private to a publisher that moves its files into place
        once they are all durable (a multi-file checkpoint's staging folder): the file is written
        under its own name there, without a temporary folder, a rename or a folder sync, and is
        removed if its write fails.
    """

    link_from: str | None = None
    create_folder: bool = True
    extra_files: tuple[tuple[str, bytes], ...] = ()
    private_folder: bool = False


@dataclass(frozen=True)
class WriteRequest:
    """One write. The save's keyword arguments travel as a pickle of their own (`kwargs_pickle`):
    a value the writer cannot unpickle (a class defined in the trainer's __main__) then fails
    this write, with its request id, instead of the whole message."""

    request_id: int
    path: str
    plan: CheckpointPlan
    source: SlabSource | SharedSource
    kwargs_pickle: bytes
    options: WriteOptions = field(default_factory=WriteOptions)
    forget: tuple[str, ...] = ()  # slabs the trainer released: unmap them

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(pickle.loads(self.kwargs_pickle))


@dataclass(frozen=True)
class WriteOutcome:
    """A WRITE_CHECKPOINT response's payload."""

    request_id: int
    result: WriteResult | None = None  # the writer's result (None from a writer of torch's shape)
    error_type: str | None = None
    error_errno: int | None = None  # the OS error number behind a failure (ENOSPC, EACCES...)


@dataclass
class WorkerRequest:
    request_type: RequestType
    payload: WorkerInit | WriteRequest | tuple[int, ...] | None = None  # CANCEL_WRITES: request ids


@dataclass
class WorkerResponse:
    request_type: RequestType
    success: bool
    error_msg: str | None = None
    payload: InitOutcome | WriteOutcome | None = None


@dataclass(frozen=True)
class Undecodable:
    """A message the writer received but could not unpickle, with the reason."""

    error: str
