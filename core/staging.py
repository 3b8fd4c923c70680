"""Staging: the snapshot of a state dict into a reusable shared-memory slab."""

from __future__ import annotations

import abc
import itertools
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from .config import CheckpointStagerConfig
from .file_format import DEFAULT_CHUNK_BYTES, chunk_digests
from .plan import CapturedState, CheckpointPlan, Lineage, PlanCache
from .slab import Slab, SlabPool

logger = logging.getLogger(__name__)


@dataclass
class StagedCheckpoint:
    """A snapshot: the plan and the slab holding its bytes. release() hands the slab back."""

    plan: CheckpointPlan
    slab: Slab
    _pool: SlabPool
    copied_nbytes: int = 0  # less than the plan's bytes when an incremental save skipped some

    def release(self) -> None:
        self._pool.release(self.slab)


class CheckpointStager(abc.ABC):
    """Takes a snapshot of a state dict that later changes to the live state cannot reach."""

    @abc.abstractmethod
    def stage(self, state_dict: Any, **kwargs: Any) -> Future[StagedCheckpoint]:
        """Begin the snapshot; the future completes when the caller may mutate `state_dict`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every buffer; idempotent."""


def _copy_into(slab: Slab, captured: CapturedState, non_blocking: bool, skip: set[int] = frozenset()) -> int:
    """Copy every storage but those in `skip` into the slab; returns the bytes copied."""
    destinations, sources = [], []
    for index, (meta, source) in enumerate(zip(captured.plan.storages, captured.sources)):
        if meta.nbytes and index not in skip:
            destinations.append(slab.view(meta.slab_offset, meta.nbytes))
            sources.append(source)
    if not sources:
        return 0
    if all(s.device.type == "cpu" for s in sources):
        torch._foreach_copy_(destinations, sources)
    else:
        for destination, source in zip(destinations, sources):
            destination.copy_(source, non_blocking=non_blocking and source.device.type == "cuda")
    return sum(s.numel() for s in sources)


class DefaultStager(CheckpointStager):
    """Copies tensors (CPU or CUDA) into one page-aligned shared slab per state dict shape.

    A later save of the same shape reuses the same slab, already faulted in, so it costs only
    the copy. Non-tensor values are deep-copied (pickled) during stage(). CPU copies finish
    before stage() returns; CUDA copies run on a side stream into pinned memory, and the
    future completes once they have, when `use_async_staging` is on.
    """

    def __init__(self, config: CheckpointStagerConfig | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self._config = config or CheckpointStagerConfig()
        self.pool = SlabPool(self._config.max_in_flight, pin=self._config.pin)
        self._stream: Any = None
        self._helper: ThreadPoolExecutor | None = None  # CUDA completion waits and prepare()
        self._hashing: ThreadPoolExecutor | None = None  # incremental saves' digests
        self._chunk_bytes = chunk_bytes
        self._sequences = itertools.count()
        self._last_of_lineage: dict[str, int] = {}
        self._plans = PlanCache()

    def _helper_thread(self) -> ThreadPoolExecutor:
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="async-ckpt-stage")
        return self._helper

    def prepare(self, state_dict: Any, file_format: str = "torch") -> Future[None]:
        """Allocate and fault in, off the calling thread, the slab a save of `state_dict` will use.

        The first save of a shape otherwise pays for fresh shared memory (page faults) on the
        training thread. The future completes when the slab is ready.
        """
        nbytes = self._plans.capture(state_dict, file_format).plan.slab_nbytes
        return self._helper_thread().submit(self._warm_slab, nbytes)

    def _warm_slab(self, nbytes: int) -> None:
        slab = self.pool.acquire(nbytes)
        try:
            slab.contents = None
            slab.tensor.zero_()  # touches every page; runs without the GIL
        finally:
            self.pool.release(slab)

    def stage(self, state_dict: Any, file_format: str = "torch", **kwargs: Any) -> Future[StagedCheckpoint]:
        """Snapshot `state_dict` for a file of `file_format` ("torch" or "safetensors")."""
        captured = self._plans.capture(state_dict, file_format)
        layout = captured.plan.layout
        slab = self.pool.acquire(
            captured.plan.slab_nbytes, prefer=lambda s: s.contents is not None and s.contents[0] == layout
        )
        staged = StagedCheckpoint(captured.plan, slab, self.pool)
        future: Future[StagedCheckpoint] = Future()
        try:
            skip, digests = self._unchanged(captured, slab) if self._config.incremental else (set(), None)
            slab.contents = None  # until the copy below has finished
            if "cuda" not in {d.type for d in captured.devices}:
                staged.copied_nbytes = _copy_into(slab, captured, non_blocking=False, skip=skip)
                if digests is not None:
                    slab.contents = (layout, digests)
                future.set_result(staged)
                return future
            self._stage_cuda(captured, staged, future)
        except BaseException:
            staged.release()
            raise
        return future

    def _unchanged(self, captured: CapturedState, slab: Slab) -> tuple[set[int], list[list[str] | None]]:
        """Which storages the slab already holds as they are now, and every CPU storage's digests.

        Also sets the plan's lineage, through which the writer reuses the previous file's chunks.
        """
        if self._hashing is None:
            self._hashing = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="async-ckpt-hash")
        plan = captured.plan
        on_cpu = [i for i, source in enumerate(captured.sources) if source.device.type == "cpu"]
        digests: list[list[str] | None] = [None] * len(captured.sources)
        hashed = chunk_digests([captured.sources[i] for i in on_cpu], self._chunk_bytes, self._hashing)
        for index, storage_digests in zip(on_cpu, hashed):
            digests[index] = storage_digests
        held = slab.contents[1] if slab.contents is not None and slab.contents[0] == plan.layout else None
        skip = {i for i, d in enumerate(digests) if d is not None and held is not None and held[i] == d}
        name = xxhash.xxh3_64_hexdigest(repr(plan.layout).encode())
        sequence = next(self._sequences)
        plan.lineage = Lineage(name, sequence, self._last_of_lineage.get(name), self._chunk_bytes, tuple(digests))
        self._last_of_lineage[name] = sequence
        return skip, digests

    def _stage_cuda(self, captured: CapturedState, staged: StagedCheckpoint, future: Future) -> None:
        non_blocking = self._config.use_non_blocking_copy
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            staged.copied_nbytes = _copy_into(staged.slab, captured, non_blocking=non_blocking)
            done = torch.cuda.Event()
            done.record(self._stream)
        if not self._config.async_staging:
            done.synchronize()
            future.set_result(staged)
            return
        # The live tensors must outlive the copies that read them.
        sources = captured.sources

        def finish() -> None:
            try:
                done.synchronize()
                future.set_result(staged)
            except BaseException as exc:  # surfaced on the future
                staged.release()
                future.set_exception(exc)
            finally:
                del sources[:]

        self._helper_thread().submit(finish)

    def close(self) -> None:
        for pool in (self._helper, self._hashing):
            if pool is not None:
                pool.shutdown(wait=True)
        self._helper = self._hashing = None
        self._plans.clear()
        self.pool.close()
