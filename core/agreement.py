"""How the ranks of one save agree before its commit: every rank's part is durable, every rank
saves the same path, and a failure on one rank fails the save on every rank at once."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .barriers import Barrier, exchanges_payloads
from .errors import BarrierTimeoutError, CheckpointCommitError
from .types import RankInfo


class RankAgreement:
    """The barrier steps of one save, from one rank's side (a no-op for a single rank)."""

    def __init__(self, rank_info: RankInfo, barrier: Barrier | None) -> None:
        self._rank_info = rank_info
        self._barrier = barrier

    @property
    def exchanges(self) -> bool:
        """Whether ranks agree through the barrier's exchange (several ranks and a barrier that has one)."""
        return self._rank_info.global_world_size > 1 and self._barrier is not None and exchanges_payloads(self._barrier)

    def tell_failure(self, path: str, exc: BaseException) -> None:
        """Let the other ranks fail this save now, with this rank's reason, instead of at their timeout."""
        if not self.exchanges or isinstance(exc, BarrierTimeoutError):
            return
        assert self._barrier is not None
        try:
            self._barrier.exchange({"path": os.path.normpath(path), "error": f"{type(exc).__name__}: {exc}"})
        except BarrierTimeoutError:
            pass

    def agree(self, path: str, payload: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Wait until every rank's part is durable; every rank must be saving the same path.

        Returns every rank's `payload`, or None when the barrier cannot exchange them (a plain
        execute_barrier, as torch's barriers have).
        """
        if self._barrier is None:
            return [payload]
        if not self.exchanges:
            self._barrier.execute_barrier()
            return [payload] if self._rank_info.global_world_size == 1 else None
        payloads = self._barrier.exchange({**payload, "path": os.path.normpath(path)})
        failed = {rank: p["error"] for rank, p in enumerate(payloads) if p.get("error")}
        if failed:
            raise CheckpointCommitError(
                f"checkpoint {path!r} was not committed: rank(s) {sorted(failed)} failed to write their part: {failed}"
            )
        paths: dict[str, list[int]] = {}
        for rank, received in enumerate(payloads):
            paths.setdefault(received["path"], []).append(rank)
        if len(paths) > 1:
            raise CheckpointCommitError(
                f"ranks saved to different paths in the same save ({paths}); every rank must call save() with "
                "the same path at the same point of training. Nothing was committed"
            )
        return list(payloads)

    def wait_for_all(self) -> None:
        """Return once every rank has arrived here."""
        if self._barrier is not None:
            self._barrier.execute_barrier()

    def commit_together(self, directory: str, rank_file: str, commit: Callable[[], None]) -> None:
        """Wait for every rank, run `commit` (rank 0's commit record; a no-op elsewhere), then
        confirm across ranks. On any failure this rank's `rank_file` is removed (it would
        otherwise be mistaken for part of a committed checkpoint) and the failure raised."""
        failure: BaseException | None = None
        try:
            self.wait_for_all()
            commit()
        except BarrierTimeoutError:
            os.unlink(rank_file)
            raise
        except BaseException as exc:
            failure = exc
        self.confirm(directory, failure)
        if failure is not None:
            os.unlink(rank_file)
            raise failure

    def confirm(self, directory: str, failure: BaseException | None) -> None:
        """Every rank returns once the commit record is written (or every rank learns it was not):
        a rank's write future must not resolve before the checkpoint it belongs to is committed."""
        if self._barrier is None:
            return
        if not self.exchanges:
            self._barrier.execute_barrier()
            return
        outcome = None if failure is None else f"{type(failure).__name__}: {failure}"
        failed = [(rank, o["error"]) for rank, o in enumerate(self._barrier.exchange({"error": outcome})) if o["error"]]
        if failed and failure is None:
            raise CheckpointCommitError(f"checkpoint {directory!r} was not committed: {failed}")
