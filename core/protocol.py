"""What crosses the socket between the trainer and its writer process.

Every message is a WorkerRequest (trainer to writer) or a WorkerResponse (writer to trainer),
named as in torch's `_experimental` checkpoint process. Tensor bytes never cross: a write
names either a staging slab (mapped once by the writer from a descriptor sent with its first
use) or one shared-memory descriptor per storage, and carries only the plan.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .plan import CheckpointPlan
from .types import RankInfo


class RequestType(Enum):
    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"
    TERMINATE_PROCESS = "exit"


@dataclass
class WorkerRequest:
    request_type: RequestType
    payload: dict[str, Any]


@dataclass
class WorkerResponse:
    request_type: RequestType
    success: bool
    error_msg: str | None = None
    payload: dict[str, Any] | None = None


@dataclass(frozen=True)
class WorkerInit:
    """The first request's payload: how the writer process builds its writer."""

    rank_info: RankInfo
    subprocess_init_fn: Callable[..., None]
    subprocess_init_args: tuple[Any, ...]
    writer_init_fn: Callable[..., Any]
    writer_init_args: dict[str, Any]


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
class WriteRequest:
    """One write. The save's keyword arguments travel as a pickle of their own (`kwargs_pickle`):
    a value the writer cannot unpickle (a class defined in the trainer's __main__) then fails
    this write, with its request id, instead of the whole message."""

    request_id: int
    path: str
    plan: CheckpointPlan
    source: SlabSource | SharedSource
    kwargs_pickle: bytes
    forget: tuple[str, ...] = field(default=())  # slabs the trainer released: unmap them

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(pickle.loads(self.kwargs_pickle))


@dataclass(frozen=True)
class Undecodable:
    """A message the writer received but could not unpickle, with the reason."""

    error: str


@dataclass(frozen=True)
class WriteOutcome:
    """A WRITE_CHECKPOINT response's payload."""

    request_id: int
    result: Any = None  # the writer's return value (a WriteResult for CheckpointWriter)
    error_type: str | None = None
    error_errno: int | None = None  # the OS error number behind a failure (ENOSPC, EACCES...)
