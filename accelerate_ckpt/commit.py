"""Agreement across ranks that a multi-file checkpoint is complete before it is published."""

from __future__ import annotations

import datetime
import os

from core.barriers import BarrierTimeoutError


class CommitVote:
    """Each rank votes whether its files of one checkpoint are durable; the committer publishes
    only when all voted yes, and the other ranks wait until it has.

    Uses a client of the TCPStore that torch.distributed runs at MASTER_ADDR:MASTER_PORT
    (`accelerate launch` sets both), so it works from a background thread without touching
    the training process group. A single process needs no store.
    """

    def __init__(self, rank: int, world_size: int, key: str, timeout_secs: float) -> None:
        self._rank = rank
        self._world_size = world_size
        self._key = key
        self._timeout = datetime.timedelta(seconds=timeout_secs)
        self._store = None

    def _connect(self):
        if self._store is None:
            from torch.distributed import PrefixStore, TCPStore

            if "MASTER_PORT" not in os.environ:
                raise RuntimeError(
                    "committing a multi-process checkpoint needs MASTER_ADDR/MASTER_PORT (set by accelerate "
                    "launch and torchrun); launch the job with one of them"
                )
            store = TCPStore(
                os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                is_master=False, timeout=self._timeout, wait_for_workers=False,
            )
            self._store = PrefixStore(f"async_ckpt/accelerate/{self._key}", store)
        return self._store

    def cast(self, ok: bool) -> bool:
        """Vote, wait for every rank's vote, and return whether all of them were yes."""
        if self._world_size == 1:
            return ok
        store = self._connect()
        store.set(f"vote/{self._rank}", "1" if ok else "0")
        keys = [f"vote/{rank}" for rank in range(self._world_size)]
        try:
            store.wait(keys, self._timeout)
        except Exception as exc:
            missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
            raise BarrierTimeoutError(
                f"checkpoint {self._key}: ranks {missing} of {self._world_size} did not report their files "
                f"within {self._timeout.total_seconds():.0f} s ({exc}); it was not committed"
            ) from exc
        return all(store.get(key) == b"1" for key in keys)

    def wait_published(self, is_committer: bool, all_ok: bool) -> None:
        """The committer announces the checkpoint is published; the other ranks wait for that."""
        if self._world_size == 1 or not all_ok:
            return
        store = self._connect()
        if is_committer:
            store.set("published", "1")
        else:
            store.wait(["published"], self._timeout)
