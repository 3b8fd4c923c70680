"""Staging: the snapshot of a state dict into a reusable shared-memory slab.

`DefaultStager.stage` returns the staged state dict (or, with async staging, a future of it),
as torch's `_experimental` stager does: a `StagedStateDict`, which is a dict whose tensors live
in the slab and whose other values are deep copies. It is built only when somebody reads it;
the writer needs only its plan (the pickle and the storages' places), which is why staging
costs the training loop little more than the copy.
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from . import torch_internals
from .config import CheckpointStagerConfig
from .errors import CheckpointConfigError, CheckpointerClosedError
from .fsutil import DEFAULT_CHUNK_BYTES
from .futures import wrap_future
from .interrupts import InterruptSafeFuture, sigint_deferred
from .manifest import chunk_digests
from .plan import CapturedState, CheckpointPlan, Lineage
from .plan_cache import PlanCache
from .rebuild import materialize
from .slab import Place, Slab, SlabContents, SlabPool, StagingLease
from .types import STATE_DICT

logger = logging.getLogger(__name__)


class StagedStateDict(dict[Any, Any]):
    """A staged snapshot, usable as a state dict: built on first read, on a private copy of the
    staged bytes, and kept valid when a later stage() reuses the slab.

    plan: what the writer needs besides the bytes; lease: the claim on the slab holding them;
    copied_nbytes: bytes this snapshot copied (fewer than the plan's when an incremental save
    found storages unchanged). Treat it as read-only: the file is written from the plan, so
    changes to this dict do not reach the checkpoint.
    """

    def __init__(self, plan: CheckpointPlan, lease: StagingLease, copied_nbytes: int) -> None:
        super().__init__()
        self.plan = plan
        self.lease = lease
        self.copied_nbytes = copied_nbytes
        self._built = False
        snapshot, earlier = weakref.ref(self), lease.before_reuse  # another view of the same snapshot
        lease.before_reuse = lambda: _build_if_alive(snapshot, earlier)

    @property
    def slab(self) -> Slab:
        return self.lease.slab

    def _build(self) -> None:
        """Rebuild the state dict on a private copy of the staged bytes (the slab gets reused)."""
        if not self._built:
            self._built = True
            storages = [self.slab.storage(s.slab_offset, s.nbytes).clone() for s in self.plan.storages]
            dict.update(self, materialize(self.plan, storages))

    # Every read goes through the snapshot; dict's own methods would see an empty dict.
    def __getitem__(self, key: Any) -> Any:
        self._build()
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        self._build()
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[Any]:
        self._build()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._build()
        return dict.__len__(self)

    def __repr__(self) -> str:
        self._build()
        return dict.__repr__(self)

    def __eq__(self, other: object) -> bool:
        self._build()
        return dict.__eq__(self, other)

    __hash__ = None

    def get(self, key: Any, default: Any = None) -> Any:
        self._build()
        return dict.get(self, key, default)

    def keys(self) -> Any:
        self._build()
        return dict.keys(self)

    def values(self) -> Any:
        self._build()
        return dict.values(self)

    def items(self) -> Any:
        self._build()
        return dict.items(self)

    def copy(self) -> dict[Any, Any]:
        self._build()
        return dict(dict.items(self))

    def __reduce_ex__(self, protocol: Any) -> Any:
        return dict, (self.copy(),)


def _holding(slab_shape: tuple[Any, ...]) -> Callable[[Slab], bool]:
    """Prefers the slab that held the last snapshot of this shape (incremental saves skip what it holds)."""
    return lambda slab: slab.contents is not None and slab.contents.slab_shape == slab_shape


def _build_if_alive(snapshot: weakref.ref[StagedStateDict], earlier: Callable[[], None] | None) -> None:
    staged = snapshot()
    if staged is not None:
        staged._build()
    if earlier is not None:
        earlier()


class CheckpointStager(abc.ABC):
    """Takes a snapshot of a state dict that later changes to the live state cannot reach."""

    @abc.abstractmethod
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """The staged state dict, or a future of it; once it is done the caller may change `state_dict`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every buffer; idempotent."""


def _copy_into(
    slab: Slab, captured: CapturedState, non_blocking: bool, skip: frozenset[int] | set[int] = frozenset()
) -> int:
    """Copy every storage but those in `skip` into the slab; returns the bytes copied.

    A storage with an exact tensor (see CapturedState) is copied from that tensor into a view of
    its dtype and shape, as a plain copy_ would; any other as bytes."""
    exact = captured.exact
    if skip:  # (incremental saves: a different set each time, not worth keeping)
        layout = _CopyLayout.of(captured, skip)
    else:
        key = ("copy", tuple(tensor is None for tensor in exact))  # (the layout is made for this pattern)
        layout = captured.memo.get(key) or captured.memo.setdefault(key, _CopyLayout.of(captured, skip))
    if not layout.places:
        return 0
    sources = [_source(captured, index, typed) for index, typed in zip(layout.indexes, layout.typed)]
    destinations = slab.views(layout.places)

    def copy() -> None:
        if layout.on_cpu:
            torch_internals.copy_many(destinations, sources)
        else:
            for destination, source in zip(destinations, sources):
                destination.copy_(source, non_blocking=non_blocking and source.device.type == "cuda")

    torch_internals.without_grad(copy)  # (a source may be a parameter: its copy must not join its autograd graph)
    return layout.nbytes


def _source(captured: CapturedState, index: int, typed: bool) -> torch.Tensor:
    tensor = captured.exact[index]
    if not typed:
        return captured.source(index)
    assert tensor is not None, "a typed place for a storage without an exact tensor"
    return tensor


@dataclass(frozen=True)
class _CopyLayout:
    """Where each storage of a plan goes in the slab, and as what: the same for every save of
    one PlanCache entry (its skeleton fixes each tensor's dtype, shape, device and exactness)."""

    places: tuple[Place, ...]
    indexes: tuple[int, ...]
    typed: tuple[bool, ...]
    on_cpu: bool
    nbytes: int

    @staticmethod
    def of(captured: CapturedState, skip: frozenset[int] | set[int]) -> _CopyLayout:
        places: list[Place] = []
        indexes = []
        for index, meta in enumerate(captured.plan.storages):
            if meta.nbytes and index not in skip:
                tensor = captured.exact[index]
                dtype, shape = (tensor.dtype, tensor.shape) if tensor is not None else (None, None)
                places.append((meta.slab_offset, meta.nbytes, dtype, shape))
                indexes.append(index)
        return _CopyLayout(
            tuple(places),
            tuple(indexes),
            tuple(place[2] is not None for place in places),
            all(d.type == "cpu" for d in captured.devices),
            sum(place[1] for place in places),
        )


class DefaultStager(CheckpointStager):
    """Copies tensors (CPU or CUDA) into one page-aligned shared slab per state dict shape.

    A later save of the same shape reuses the same slab, already faulted in, so it costs only
    the copy. Non-tensor values are deep-copied (pickled) during stage(). Without async staging
    the copies are done when stage() returns; with it (the default where CUDA is present) they
    run on a helper thread (CUDA: on a side stream into pinned memory) and the returned future
    completes once they have. When the first save of a shape created its slab and another may
    exist, a second one is readied in the background, so the next save pays no page faults.
    """

    def __init__(self, config: CheckpointStagerConfig | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self._config = config or CheckpointStagerConfig()
        if self._config.use_non_blocking_copy and not torch.accelerator.is_available():
            raise CheckpointConfigError(
                "CheckpointStagerConfig(use_non_blocking_copy=True) needs an accelerator, and none is available; "
                "leave it None to use non-blocking copies only where CUDA is present"
            )
        self.pool = SlabPool(
            self._config.max_in_flight, pin=self._config.pin, budget_bytes=self._config.in_flight_bytes
        )
        self._stream: Any = None
        self._helper: ThreadPoolExecutor | None = None  # async copies, CUDA completion waits, slab warming
        self._hashing: ThreadPoolExecutor | None = None  # incremental saves' digests
        self._chunk_bytes = chunk_bytes
        self._sequences = itertools.count()
        self._last_of_lineage: dict[str, int] = {}
        self._plans = PlanCache()
        self._closed = False

    def _on_helper_thread(self, work: Callable[..., None], *args: Any) -> Future[None]:
        """Run `work(*args)` on the stager's thread. (Handed over with SIGINT deferred: a Ctrl-C
        inside the executor's submit could leave its semaphore's lock held, see interrupts.py.)"""
        if self._closed:
            raise CheckpointerClosedError("the stager is closed; create a new checkpointer")
        with sigint_deferred():
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix="async-ckpt-stage")
            return self._helper.submit(work, *args)

    def prepare(self, state_dict: Any, file_format: str = "torch") -> Future[None]:
        """Allocate and fault in, off the calling thread, the slab a save of `state_dict` will use.

        The first save of a shape otherwise pays for fresh shared memory (page faults) on the
        training thread. The future completes when the slab is ready.
        """
        nbytes = self._plans.capture(state_dict, file_format).plan.slab_nbytes
        return wrap_future(self._on_helper_thread(self._warm_slab, nbytes))  # (one a Ctrl-C cannot lock)

    def plan_of(self, state_dict: Any, file_format: str = "torch") -> CheckpointPlan:
        """The plan a save of `state_dict` would write (its pickle and storages), copying nothing."""
        return self._plans.capture(state_dict, file_format).plan

    def _warm_slab(self, nbytes: int, besides: Slab | None = None) -> None:
        lease = self.pool.new_spare(nbytes, besides)
        if lease is None:
            return
        try:
            lease.slab.touch()
        finally:
            self.pool.abandon(lease)

    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """Snapshot `state_dict` for a file of kwargs' `file_format` ("torch", the default, or "safetensors")."""
        if self._closed:
            raise CheckpointerClosedError("stage() on a closed DefaultStager; create a new one")
        captured = self._plans.capture(state_dict, kwargs.get("file_format", "torch"))
        slab_shape = captured.plan.slab_shape
        lease: StagingLease | None = None
        try:
            # Waiting for a slab stays interruptible; taking one is not: a Ctrl-C arrives after the
            # assignment, inside this try, which gives the slab back.
            waited = 0.0
            while lease is None:
                with sigint_deferred():
                    lease = self.pool.try_acquire(captured.plan.slab_nbytes, prefer=_holding(slab_shape))
                if lease is None:
                    waited = self.pool.wait_for_room(waited)
            skip, digests = self._unchanged(captured, lease.slab) if self._config.incremental else (set(), None)
            lease.slab.contents = None  # until the copy below has finished
            on_cuda = "cuda" in {d.type for d in captured.devices}
            if not (self._config.async_staging or on_cuda):
                staged = self._copy(captured, lease, skip, digests)
                self.pool.staged(lease)
                self._warm_spare(lease)
                return staged
            future: Future[STATE_DICT] = InterruptSafeFuture()
            if on_cuda:
                self._stage_cuda(captured, lease, future)
            else:
                self._on_helper_thread(self._finish_in_background, future, captured, lease, skip, digests)
        except BaseException:
            if lease is not None:
                self.pool.abandon(lease)
            raise
        if not self._config.async_staging:
            result = future.result()
            self._warm_spare(lease)
            return result
        return future

    def _copy(
        self, captured: CapturedState, lease: StagingLease, skip: set[int], digests: list[list[str] | None] | None
    ) -> StagedStateDict:
        copied = _copy_into(lease.slab, captured, non_blocking=False, skip=skip)
        if digests is not None:
            lease.slab.contents = SlabContents(captured.plan.slab_shape, digests)
        return StagedStateDict(captured.plan, lease, copied)

    def _finish_in_background(
        self,
        future: Future[Any],
        captured: CapturedState,
        lease: StagingLease,
        skip: set[int],
        digests: list[list[str] | None] | None,
    ) -> None:
        try:
            staged = self._copy(captured, lease, skip, digests)
        except BaseException as exc:  # surfaced on the future
            self.pool.abandon(lease)
            future.set_exception(exc)
            return
        future.set_result(staged)  # callbacks (a write taking hold of the lease) run first
        self.pool.staged(lease)

    def _warm_spare(self, lease: StagingLease) -> None:
        """Once a save has shown a shape, ready a second slab for it off the training thread
        (unless one that fits exists already)."""
        if self.pool.has_room:
            self._on_helper_thread(self._warm_slab, lease.slab.nbytes, lease.slab)

    def _unchanged(self, captured: CapturedState, slab: Slab) -> tuple[set[int], list[list[str] | None]]:
        """Which storages the slab already holds as they are now, and every CPU storage's digests.

        Also sets the plan's lineage, through which the writer reuses the previous file's chunks.
        """
        if self._hashing is None:
            self._hashing = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="async-ckpt-hash")
        plan = captured.plan
        on_cpu = [i for i, source in enumerate(captured.sources) if source.device.type == "cpu"]
        digests: list[list[str] | None] = [None] * len(captured.sources)
        with sigint_deferred():  # (waits on the pool's futures: see interrupts.py)
            hashed = chunk_digests([captured.sources[i] for i in on_cpu], self._chunk_bytes, self._hashing)
        for index, storage_digests in zip(on_cpu, hashed):
            digests[index] = storage_digests
        contents = slab.contents
        held = contents.digests if contents is not None and contents.slab_shape == plan.slab_shape else None
        skip = {i for i, d in enumerate(digests) if d is not None and held is not None and held[i] == d}
        name = xxhash.xxh3_64_hexdigest(repr(plan.slab_shape).encode())
        sequence = next(self._sequences)
        plan.lineage = Lineage(name, sequence, self._last_of_lineage.get(name), self._chunk_bytes, tuple(digests))
        self._last_of_lineage[name] = sequence
        return skip, digests

    def _stage_cuda(self, captured: CapturedState, lease: StagingLease, future: Future[Any]) -> None:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            copied = _copy_into(lease.slab, captured, non_blocking=self._config.non_blocking)
            done = torch.cuda.Event()
            done.record(self._stream)
        staged = StagedStateDict(captured.plan, lease, copied)
        # The live tensors must outlive the copies that read them.
        sources = captured.sources

        def finish() -> None:
            try:
                done.synchronize()
            except BaseException as exc:  # surfaced on the future
                self.pool.abandon(lease)
                future.set_exception(exc)
                return
            finally:
                del sources[:]
            future.set_result(staged)
            self.pool.staged(lease)

        self._on_helper_thread(finish)

    def close(self) -> None:
        """Wait for background copies, then release every slab; idempotent."""
        self._closed = True
        for pool in (self._helper, self._hashing):
            if pool is not None:
                pool.shutdown(wait=True)
        self._helper = self._hashing = None
        self._plans.clear()
        self.pool.close()

    def __enter__(self) -> DefaultStager:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
