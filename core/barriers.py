"""Barriers that hold every rank's commit until all ranks have written their files.

A Barrier has torch's `execute_barrier()`; ours also `exchange(payload)`, which lets the ranks
agree on what they commit (the path, each rank's file and write id) and tell each other of a
failure at once. A barrier with only execute_barrier (torch's shape) works too: the writer
then reads the ranks' files from the directory instead.
"""

from __future__ import annotations

import abc
import datetime
import json
import logging
import os
from collections import Counter
from typing import Any, TypeVar

import torch.distributed as dist
import torch.distributed.elastic.utils.store as store_util

from .config import BarrierConfig
from .errors import BarrierTimeoutError, CheckpointConfigError
from .types import RankInfo, default_rank_info

logger = logging.getLogger(__name__)

BARRIER_REGISTRY: dict[str, type[Barrier]] = {}
_B = TypeVar("_B", bound=type)


def register_barrier(barrier_class_or_name: Any) -> Any:
    """Register a barrier class under its `barrier_type` (used as a plain decorator, as in torch),
    or under a name: `@register_barrier("mine")`."""
    if isinstance(barrier_class_or_name, str):
        name = barrier_class_or_name

        def register(cls: _B) -> _B:
            BARRIER_REGISTRY[name] = cls
            return cls

        return register
    cls = barrier_class_or_name
    if hasattr(cls, "barrier_type"):
        BARRIER_REGISTRY[cls.barrier_type] = cls
    return cls


def create_barrier_from_config(
    barrier_config: BarrierConfig,
    rank_info: RankInfo | None = None,
    *,
    in_writer_process: bool = False,
    timeout_secs: float | None = None,
) -> Barrier | None:
    """The barrier `barrier_config` names, built with its arguments, or None for no barrier.

    "auto" resolves as BarrierConfig says; our barriers get rank, world size and timeout from
    the job unless barrier_args name them. A registered class of torch's shape gets exactly
    barrier_args.
    """
    rank_info = rank_info or default_rank_info()
    kind = barrier_config.barrier_type
    if kind == "auto":
        if rank_info.global_world_size == 1:
            return None
        kind = "tcp_store" if in_writer_process else "dist_barrier"
    if kind is None:
        return None
    if kind not in BARRIER_REGISTRY:
        raise ValueError(f"unknown barrier_type {kind!r}; choose one of {sorted(BARRIER_REGISTRY)}, 'auto' or None")
    cls = BARRIER_REGISTRY[kind]
    args = dict(barrier_config.barrier_args)
    if cls in (DistBarrier, TCPStoreBarrier) and timeout_secs is not None:
        args.setdefault("timeout_secs", timeout_secs)
    if cls is TCPStoreBarrier:
        args.setdefault("global_rank", rank_info.global_rank)
        args.setdefault("global_world_size", rank_info.global_world_size)
    return cls(**args)


class Barrier(abc.ABC):
    """Blocks until every rank has arrived for the same checkpoint."""

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        """Return once every rank has arrived; raise BarrierTimeoutError naming the missing ones."""

    def exchange(self, payload: Any = None) -> list[Any]:
        """Publish this rank's JSON-serialisable `payload`, wait for every rank's, return them by rank."""
        raise NotImplementedError(f"{type(self).__name__} cannot exchange values between ranks")


def exchanges_payloads(barrier: Any) -> bool:
    """Whether `barrier` implements exchange (ours do; torch's shape of barrier does not)."""
    return isinstance(barrier, Barrier) and type(barrier).exchange is not Barrier.exchange


@register_barrier
class DistBarrier(Barrier):
    """A barrier over torch.distributed, run by the process that owns the process group.

    group: the group to use; None uses the default group when its backend is gloo, and
    otherwise a gloo group created here for checkpointing (every rank must build its
    DistBarrier at the same point, as with any new group), so checkpoint traffic never
    shares a group with training collectives and missing ranks can be named. Suits
    SyncCheckpointer; the async writer process uses TCPStoreBarrier.
    """

    barrier_type = "dist_barrier"

    def __init__(self, group: Any = None, timeout_secs: float = 600) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise CheckpointConfigError(
                "DistBarrier requires an initialized process group: call torch.distributed.init_process_group first"
            )
        self._timeout = datetime.timedelta(seconds=timeout_secs)
        if group is None and dist.get_backend() != "gloo":
            group = dist.new_group(backend="gloo", timeout=self._timeout)
        self._group = group

    def execute_barrier(self) -> None:
        if dist.get_backend(self._group) == "gloo":
            try:
                dist.monitored_barrier(group=self._group, timeout=self._timeout)
            except RuntimeError as exc:
                raise BarrierTimeoutError(f"checkpoint barrier failed: {exc}") from exc
        else:
            dist.barrier(group=self._group)

    def exchange(self, payload: Any = None) -> list[Any]:
        self.execute_barrier()
        payloads: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(payloads, payload, group=self._group)
        return payloads


@register_barrier
class TCPStoreBarrier(Barrier):
    """A barrier over a TCPStore, usable from any process that can reach the store.

    Given torch's arguments (`tcpstore_port`, `master_address`, ...) it hosts its own store on
    rank 0, as torch's TCPStoreBarrier does. Without them it connects, as a client, to the
    store at MASTER_ADDR:MASTER_PORT that torch.distributed already runs (torchrun and
    accelerate launch set both), under a key prefix of its own, on first use. Unlike torch's,
    execute_barrier honours `timeout_secs` and names the ranks that did not arrive.
    """

    barrier_type = "tcp_store"

    def __init__(
        self,
        global_rank: int,
        global_world_size: int,
        barrier_prefix: str = "async_ckpt/barrier",
        timeout_barrier_init_secs: float | None = None,
        use_checkpoint_barrier_tcpstore_libuv: bool | None = None,
        tcpstore_port: int | None = None,
        master_address: str | None = None,
        timeout_secs: float = 600,
    ) -> None:
        self._rank = global_rank
        self._world_size = global_world_size
        self._prefix = barrier_prefix
        self._timeout = datetime.timedelta(seconds=timeout_secs)
        self._sequence: Counter[str] = Counter()
        self._store: Any = None
        if tcpstore_port is not None:  # torch's shape: a store of its own, hosted by rank 0
            self._store = dist.TCPStore(
                master_address or os.environ.get("MASTER_ADDR", "127.0.0.1"),
                int(tcpstore_port),
                world_size=global_world_size,
                timeout=datetime.timedelta(seconds=timeout_barrier_init_secs or timeout_secs),
                is_master=(global_rank == 0),
            )
        elif "MASTER_PORT" not in os.environ:
            raise ValueError(
                "TCPStoreBarrier needs a store: pass tcpstore_port=... (and master_address), or set "
                "MASTER_ADDR/MASTER_PORT (torchrun and accelerate launch set both)"
            )

    def _connect(self) -> Any:
        if self._store is None:
            store = dist.TCPStore(
                os.environ.get("MASTER_ADDR", "127.0.0.1"),
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=self._timeout,
                wait_for_workers=False,
            )
            self._store = dist.PrefixStore(self._prefix, store)
        return self._store

    def _next(self, kind: str) -> int:
        sequence = self._sequence[kind]
        self._sequence[kind] += 1
        return sequence

    def execute_barrier(self) -> None:
        store = self._connect()
        sequence = self._next("barrier")
        store.set(f"rank{self._rank}", str(sequence))
        try:
            store_util.barrier(
                store=store,
                world_size=self._world_size,
                key_prefix=self._prefix + str(sequence),
                barrier_timeout=self._timeout.total_seconds(),
                rank=self._rank,
            )
        except Exception as exc:
            raise BarrierTimeoutError(
                f"checkpoint barrier timed out after {self._timeout.total_seconds():.0f} s on rank {self._rank} "
                f"of {self._world_size}: {exc}"
            ) from exc

    def exchange(self, payload: Any = None) -> list[Any]:
        store = self._connect()
        generation = self._next("exchange")
        keys = [f"{self._prefix}/exchange/{generation}/{rank}" for rank in range(self._world_size)]
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
