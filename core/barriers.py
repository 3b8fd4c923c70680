"""Barriers that hold every rank's commit until all ranks have written their files."""

from __future__ import annotations

import abc
import datetime
import logging
import os
from typing import Any, Callable

from .config import BarrierConfig
from .errors import CheckpointError

logger = logging.getLogger(__name__)

BARRIER_REGISTRY: dict[str, Callable[..., "Barrier"]] = {}


class BarrierTimeoutError(CheckpointError, TimeoutError):
    """Not every rank reached the checkpoint barrier in time."""


def register_barrier(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        BARRIER_REGISTRY[name] = cls
        return cls

    return register


def create_barrier_from_config(config: BarrierConfig) -> "Barrier | None":
    """The barrier `config` names, built with its arguments, or None for no barrier."""
    if config.barrier_type is None:
        return None
    if config.barrier_type not in BARRIER_REGISTRY:
        raise ValueError(
            f"unknown barrier_type {config.barrier_type!r}; choose one of {sorted(BARRIER_REGISTRY)} or None"
        )
    return BARRIER_REGISTRY[config.barrier_type](**config.barrier_args)


class Barrier(abc.ABC):
    """Blocks until every rank has called execute_barrier() for the same checkpoint."""

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        """Return once all ranks arrived; raise BarrierTimeoutError naming the missing ones otherwise."""


@register_barrier("dist_barrier")
class DistBarrier(Barrier):
    """torch.distributed barrier on `group` (default: the default process group).

    On a gloo group it uses monitored_barrier, which names the ranks that did not arrive.
    Runs in the process that owns the group, so it suits SyncCheckpointer; the async writer
    process uses TCPStoreBarrier.
    """

    def __init__(self, group: Any = None, timeout_secs: float = 600) -> None:
        self._group = group
        self._timeout = datetime.timedelta(seconds=timeout_secs)

    def execute_barrier(self) -> None:
        import torch.distributed as dist

        if dist.get_backend(self._group) == "gloo":
            try:
                dist.monitored_barrier(group=self._group, timeout=self._timeout)
            except RuntimeError as exc:
                raise BarrierTimeoutError(f"checkpoint barrier failed: {exc}") from exc
        else:
            dist.barrier(group=self._group)


@register_barrier("tcp_store")
class TCPStoreBarrier(Barrier):
    """A barrier over a TCPStore, usable from any process that can reach the store.

    By default it connects, as a client, to the store at MASTER_ADDR:MASTER_PORT that
    torch.distributed already runs, under a key prefix of its own; pass `is_master=True` on
    one rank to host a separate store.
    """

    def __init__(
        self,
        global_rank: int,
        global_world_size: int,
        host: str | None = None,
        port: int | None = None,
        timeout_secs: float = 600,
        barrier_prefix: str = "async_ckpt/barrier",
        is_master: bool = False,
    ) -> None:
        from torch.distributed import PrefixStore, TCPStore

        self._rank = global_rank
        self._world_size = global_world_size
        self._timeout = datetime.timedelta(seconds=timeout_secs)
        store = TCPStore(
            host or os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(port or os.environ["MASTER_PORT"]),
            world_size=global_world_size if is_master else None,
            is_master=is_master,
            timeout=self._timeout,
            wait_for_workers=False,
        )
        self._store = PrefixStore(barrier_prefix, store)
        self._generation = 0

    def execute_barrier(self) -> None:
        generation = self._generation
        self._generation += 1
        keys = [f"{generation}/{rank}" for rank in range(self._world_size)]
        self._store.set(keys[self._rank], "1")
        try:
            self._store.wait(keys, self._timeout)
        except Exception as exc:
            missing = [rank for rank, key in enumerate(keys) if not self._store.check([key])]
            raise BarrierTimeoutError(
                f"checkpoint barrier timed out after {self._timeout.total_seconds():.0f} s: "
                f"ranks {missing} of {self._world_size} did not arrive ({exc})"
            ) from exc
