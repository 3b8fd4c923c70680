"""The default init functions the writer process runs to build its CheckpointWriter.

They run in the writer process (which imports this module, not the trainer's process.py); the
trainer only names them in its first request.
"""

from __future__ import annotations

from typing import Any

from .config import BarrierConfig, CheckpointWriterConfig
from .types import RankInfo
from .writer import CheckpointWriter, WriterHook


def default_subprocess_init_fn(*args: Any) -> None:
    """Runs first in the writer process; the default does nothing."""


def default_writer_init_fn(
    rank_info: RankInfo,
    writer_config: CheckpointWriterConfig | None = None,
    barrier_config: BarrierConfig | None = None,
    commit_hook: WriterHook | None = None,
) -> CheckpointWriter:
    """Builds the writer process's CheckpointWriter, with the barrier its config names."""
    from .barriers import create_barrier_from_config

    writer_config = writer_config or CheckpointWriterConfig()
    barrier = create_barrier_from_config(
        barrier_config or BarrierConfig(),
        rank_info,
        in_writer_process=True,
        timeout_secs=writer_config.write_barrier_timeout_secs,
    )
    return CheckpointWriter(writer_config, rank_info, barrier, commit_hook)
