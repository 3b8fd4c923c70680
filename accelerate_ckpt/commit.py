"""Agreement across ranks that a multi-file checkpoint is complete before it is published."""

from __future__ import annotations

from core.barriers import TCPStoreBarrier
from core.errors import BarrierTimeoutError


class CommitVote:
    """Each rank votes whether its files of one checkpoint are durable; the committer publishes
    only when all voted yes, and the other ranks wait until it has.

    Runs over the core's TCPStoreBarrier (a client of the store at MASTER_ADDR:MASTER_PORT that
    `accelerate launch` sets up), so it works from a background thread without touching the
    training process group. A single process needs no store.
    """

    def __init__(self, rank: int, world_size: int, checkpoint: str, generation: int, timeout_secs: float) -> None:
        self._checkpoint = checkpoint
        self._barrier = None
        if world_size > 1:
            prefix = f"async_ckpt/accelerate/{checkpoint}#{generation}"
            self._barrier = TCPStoreBarrier(rank, world_size, timeout_secs=timeout_secs, barrier_prefix=prefix)

    def cast(self, ok: bool) -> bool:
        """Vote, wait for every rank's vote, and return whether all of them were yes."""
        if self._barrier is None:
            return ok
        try:
            return all(vote["ok"] for vote in self._barrier.exchange({"ok": ok}))
        except BarrierTimeoutError as exc:
            raise BarrierTimeoutError(f"checkpoint {self._checkpoint} was not committed: {exc}") from exc

    def wait_published(self, all_ok: bool) -> None:
        """Every rank returns once the committer, which arrives after publishing, has."""
        if self._barrier is not None and all_ok:
            self._barrier.execute_barrier()
