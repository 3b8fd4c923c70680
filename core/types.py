"""Small value types shared by every part of the core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STATE_DICT = dict[str, Any]


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a (possibly single-process) job."""

    global_rank: int
    global_world_size: int

    def __post_init__(self) -> None:
        if self.global_world_size < 1:
            raise ValueError(f"RankInfo.global_world_size must be >= 1, got {self.global_world_size}")
        if not 0 <= self.global_rank < self.global_world_size:
            raise ValueError(
                f"RankInfo.global_rank must be in [0, {self.global_world_size}), got {self.global_rank}"
            )


def default_rank_info() -> RankInfo:
    """RankInfo of the default process group when one is initialised, else a single rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return RankInfo(global_rank=dist.get_rank(), global_world_size=dist.get_world_size())
    return RankInfo(global_rank=0, global_world_size=1)


@dataclass(frozen=True)
class WriteResult:
    """What one committed save cost; the value of a completed write future."""

    path: str
    files: tuple[str, ...]
    nbytes: int
    write_seconds: float

    @property
    def throughput_gbps(self) -> float:
        return self.nbytes / self.write_seconds / 1e9 if self.write_seconds > 0 else float("inf")
