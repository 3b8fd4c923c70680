"""make_sync_checkpointer / make_async_checkpointer: checkpointers with sensible defaults."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from typing import Any

from .barriers import create_barrier_from_config
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .config import BarrierConfig, CheckpointerConfig
from .process import CheckpointProcess
from .reader import CheckpointReader
from .staging import DefaultStager
from .types import RankInfo, default_rank_info
from .writer import CheckpointWriter, WriterHook
from .writer_factory import default_subprocess_init_fn, default_writer_init_fn

_async_checkpointers_made = itertools.count()


def _with_own_store_prefix(config: BarrierConfig) -> BarrierConfig:
    """Give each async checkpointer of a job its own TCPStore keys (ranks create theirs in the same
    order, so the n-th checkpointer of every rank gets the same prefix; a torchrun restart, new ones)."""
    if config.barrier_type not in ("auto", "tcp_store") or "barrier_prefix" in config.barrier_args:
        return config
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"async_ckpt/barrier/{attempt}/{next(_async_checkpointers_made)}"
    return dataclasses.replace(config, barrier_args={**config.barrier_args, "barrier_prefix": prefix})


def make_sync_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
) -> SyncCheckpointer:
    """A checkpointer that writes in the calling thread; rank from the process group by default."""
    config = config or CheckpointerConfig()
    rank_info = rank_info or default_rank_info()
    barrier = create_barrier_from_config(
        config.barrier_config,
        rank_info,
        in_writer_process=False,
        timeout_secs=config.writer_config.write_barrier_timeout_secs,
    )
    writer = CheckpointWriter(config.writer_config, rank_info, barrier, commit_hook)
    return SyncCheckpointer(writer, CheckpointReader(rank_info))


def make_async_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
    subprocess_init_args: tuple[Any, ...] = (),
    checkpoint_writer_init_fn: Callable[..., CheckpointWriter] = default_writer_init_fn,
    checkpoint_writer_init_args: dict[str, Any] | None = None,
    commit_hook: WriterHook | None = None,
) -> AsyncCheckpointer:
    """A checkpointer whose saves return after the snapshot; a spawned process writes them.

    With the default writer factory, the worker's writer uses `config.writer_config`,
    `config.barrier_config` (built inside the worker: "auto" picks "tcp_store" there when
    there are several ranks) and `commit_hook` (which must be picklable). Given your own
    `checkpoint_writer_init_fn`, it is called in the writer process with
    `checkpoint_writer_init_args`, plus `rank_info` unless those name it; a writer whose class
    overrides `write()` is given the state dict, rebuilt on the staged memory.
    """
    config = config or CheckpointerConfig()
    rank_info = rank_info or default_rank_info()
    if checkpoint_writer_init_args is None:
        checkpoint_writer_init_args = {
            "writer_config": config.writer_config,
            "barrier_config": _with_own_store_prefix(config.barrier_config),
            "commit_hook": commit_hook,
        }
    process = CheckpointProcess(
        rank_info,
        config.process_config,
        subprocess_init_fn,
        subprocess_init_args,
        checkpoint_writer_init_fn,
        checkpoint_writer_init_args,
    )
    return AsyncCheckpointer(
        DefaultStager(config.staging_config, chunk_bytes=config.writer_config.chunk_bytes),
        process,
        CheckpointReader(rank_info),
    )
