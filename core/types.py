"""Small value types shared by every part of the core."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

STATE_DICT = dict[str, Any]


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a (possibly single-process) job.

    local_rank: its index among the ranks of its machine (None: unknown); with per-node local
    disks the first rank of each node writes that node's commit record.
    """

    global_rank: int
    global_world_size: int
    local_rank: int | None = None

    def __post_init__(self) -> None:
        if self.global_world_size < 1:
            raise ValueError(f"RankInfo.global_world_size must be >= 1, got {self.global_world_size}")
        if not 0 <= self.global_rank < self.global_world_size:
            raise ValueError(f"RankInfo.global_rank must be in [0, {self.global_world_size}), got {self.global_rank}")


def default_rank_info() -> RankInfo:
    """RankInfo of the default process group when one is initialised, else a single rank.

    The local rank comes from LOCAL_RANK, which torchrun and accelerate launch set.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        local = os.environ.get("LOCAL_RANK")
        return RankInfo(dist.get_rank(), dist.get_world_size(), int(local) if local is not None else None)
    return RankInfo(global_rank=0, global_world_size=1, local_rank=0)


@dataclass(frozen=True)
class WriteResult:
    """What one committed save cost; the value of a completed write future.

    nbytes: tensor bytes in the checkpoint; write_seconds: the writer's time from the first
    byte to the commit; blocking_seconds: how long save() held the caller (the snapshot);
    persist_seconds: from the save() call until the checkpoint was durable and committed.
    copied_nbytes: bytes the snapshot copied (fewer than nbytes when an incremental save
    found tensors unchanged); reused_nbytes: bytes the writer copied from the previous
    checkpoint file instead of writing them. phases: where the writer's time went (creating
    the temporary file, the file's skeleton, data, manifest and fsync, the pre-commit hook, the
    barrier, publishing, cleanup, what follows the commit).
    """

    path: str
    files: tuple[str, ...]
    nbytes: int
    write_seconds: float
    blocking_seconds: float = 0.0
    persist_seconds: float = 0.0
    copied_nbytes: int = 0
    reused_nbytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # the writer's seconds per step of the write
    cancelled: bool = False  # cancelled (its folder deleted, or the save removed) before it was published
    superseded: bool = False  # skipped: a newer save of the same path was queued behind it (see worker.py)

    @property
    def skipped(self) -> bool:
        """Whether nothing of this save was published (it was cancelled or superseded)."""
        return self.cancelled or self.superseded

    @property
    def throughput_gbps(self) -> float:
        return self.nbytes / self.write_seconds / 1e9 if self.write_seconds > 0 else float("inf")

    def metrics(self, prefix: str = "checkpoint/") -> dict[str, float]:
        """This save's numbers under logger-friendly names (Lightning's log_dict, Accelerate's log)."""
        return {
            f"{prefix}blocking_s": self.blocking_seconds,
            f"{prefix}persist_s": self.persist_seconds,
            f"{prefix}write_s": self.write_seconds,
            f"{prefix}size_mb": self.nbytes / 1e6,
            f"{prefix}write_gbps": self.throughput_gbps,
            f"{prefix}copied_mb": self.copied_nbytes / 1e6,
            f"{prefix}reused_mb": self.reused_nbytes / 1e6,
        }


@dataclass
class CheckpointStats:
    """Running totals of a checkpointer's committed saves, and the last one."""

    saves: int = 0
    nbytes: int = 0
    copied_nbytes: int = 0  # by the snapshots
    written_nbytes: int = 0  # by the writer (nbytes less what it reused, linked or cloned)
    blocking_seconds: float = 0.0
    persist_seconds: float = 0.0
    last: WriteResult | None = None

    def record(self, result: WriteResult) -> None:
        self.saves += 1
        self.nbytes += result.nbytes
        self.copied_nbytes += result.copied_nbytes
        self.written_nbytes += result.nbytes - result.reused_nbytes
        self.blocking_seconds += result.blocking_seconds
        self.persist_seconds += result.persist_seconds
        self.last = result
