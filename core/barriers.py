"""Barriers that hold every rank's commit until all ranks have written their files."""

from __future__ import annotations

import abc
import datetime
import json
import logging
import os
from typing import Any, Callable

from .config import BarrierConfig
from .errors import BarrierTimeoutError
from .types import RankInfo

logger = logging.getLogger(__name__)

BARRIER_REGISTRY: dict[str, Callable[..., "Barrier"]] = {}


def register_barrier(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        BARRIER_REGISTRY[name] = cls
        return cls

    return register


def create_barrier_from_config(
    config: BarrierConfig, rank_info: RankInfo, *, in_writer_process: bool, timeout_secs: float = 600
) -> "Barrier | None":
    """The barrier `config` names, built with its arguments, or None for no barrier.

    "auto" resolves as BarrierConfig says; rank, world size and timeout default to the job's.
    """
    kind = config.barrier_type
    if kind == "auto":
        if rank_info.global_world_size == 1:
            return None
        kind = "tcp_store" if in_writer_process else "dist_barrier"
    if kind is None:
        return None
    if kind not in BARRIER_REGISTRY:
        raise ValueError(f"unknown barrier_type {kind!r}; choose one of {sorted(BARRIER_REGISTRY)}, 'auto' or None")
    args = {"timeout_secs": timeout_secs, **config.barrier_args}
    if kind == "tcp_store":
        args = {"global_rank": rank_info.global_rank, "global_world_size": rank_info.global_world_size, **args}
    return BARRIER_REGISTRY[kind](**args)


class Barrier(abc.ABC):
    """Blocks until every rank has arrived for the same checkpoint, and shares one small value per rank."""

    @abc.abstractmethod
    def exchange(self, payload: Any = None) -> list[Any]:
        """Publish this rank's JSON-serialisable `payload`, wait for every rank's, return them by rank.

        Raises BarrierTimeoutError naming the ranks that did not arrive within the timeout.
        """

    def execute_barrier(self) -> None:
        """Return once all ranks arrived (an exchange of nothing)."""
        self.exchange(None)


@register_barrier("dist_barrier")
class DistBarrier(Barrier):
    """A barrier over torch.distributed, run by the process that owns the process group.

    group: the group to use; None uses the default group when its backend is gloo, and
    otherwise a gloo group created here for checkpointing (every rank must build its
    DistBarrier at the same point, as with any new group), so checkpoint traffic never
    shares a group with training collectives and missing ranks can be named. Suits
    SyncCheckpointer; the async writer process uses TCPStoreBarrier.
    """

    def __init__(self, group: Any = None, timeout_secs: float = 600) -> None:
        import torch.distributed as dist

        self._timeout = datetime.timedelta(seconds=timeout_secs)
        if group is None and dist.get_backend() != "gloo":
            group = dist.new_group(backend="gloo", timeout=self._timeout)
        self._group = group

    def exchange(self, payload: Any = None) -> list[Any]:
        import torch.distributed as dist

        if dist.get_backend(self._group) == "gloo":
            try:
                dist.monitored_barrier(group=self._group, timeout=self._timeout)
            except RuntimeError as exc:
                raise BarrierTimeoutError(f"checkpoint barrier failed: {exc}") from exc
        else:
            dist.barrier(group=self._group)
        payloads: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(payloads, payload, group=self._group)
        return payloads


@register_barrier("tcp_store")
class TCPStoreBarrier(Barrier):
    """A barrier over a TCPStore, usable from any process that can reach the store.

    By default it connects, as a client, to the store at MASTER_ADDR:MASTER_PORT that
    torch.distributed already runs (torchrun and accelerate launch set both), under a key
    prefix of its own; pass `is_master=True` on one rank to host a separate store. It
    connects on first use.
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
        self._rank = global_rank
        self._world_size = global_world_size
        self._timeout = datetime.timedelta(seconds=timeout_secs)
        self._host = host or os.environ.get("MASTER_ADDR", "127.0.0.1")
        if port is None and "MASTER_PORT" not in os.environ:
            raise ValueError(
                "TCPStoreBarrier needs the store's port: pass port=..., or set MASTER_ADDR/MASTER_PORT "
                "(torchrun and accelerate launch set both)"
            )
        self._port = int(port or os.environ["MASTER_PORT"])
        self._is_master = is_master
        self._prefix = barrier_prefix
        self._store: Any = None
        self._generation = 0

    def _connect(self) -> Any:
        if self._store is None:
            from torch.distributed import PrefixStore, TCPStore

            store = TCPStore(
                self._host,
                self._port,
                world_size=self._world_size if self._is_master else None,
                is_master=self._is_master,
                timeout=self._timeout,
                wait_for_workers=False,
            )
            self._store = PrefixStore(self._prefix, store)
        return self._store

    def exchange(self, payload: Any = None) -> list[Any]:
        store = self._connect()
        generation = self._generation
        self._generation += 1
        keys = [f"{generation}/{rank}" for rank in range(self._world_size)]
        store.set(keys[self._rank], json.dumps(payload))
        try:
            store.wait(keys, self._timeout)
        except Exception as exc:
            missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
            raise BarrierTimeoutError(
                f"checkpoint barrier timed out after {self._timeout.total_seconds():.0f} s: "
                f"ranks {missing} of {self._world_size} did not arrive ({exc})"
            ) from exc
        return [json.loads(store.get(key)) for key in keys]
