"""Page-aligned host memory that the trainer and the writer process both map.

A slab is an anonymous memory file (`memfd_create`): it has no name under /dev/shm, so
nothing can leak there, and the kernel frees it once the last process that maps it or holds
its descriptor is gone, whether that process closed it, raised, or was killed. The writer
process receives the descriptor over its socket (SCM_RIGHTS) and maps the same pages.

Each staged snapshot holds a lease on its slab. A write holds the lease until it is done; a
snapshot nobody is writing does not pin its slab, so a later stage() may reuse that slab
(as torch's own stager reuses its cached buffers) and never waits for it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import torch_internals
from .errors import CheckpointerClosedError
from .fsutil import PAGE_SIZE, round_up
from .interrupts import InterruptSafeCondition

logger = logging.getLogger(__name__)

_slab_ids = itertools.count()


Place = tuple[int, int, "torch.dtype | None", "torch.Size | None"]  # offset, nbytes, and the view's dtype and shape


@dataclass(frozen=True)
class SlabContents:
    """What a slab holds, for incremental saves: the plan's slab shape and each storage's digests."""

    slab_shape: tuple[Any, ...]
    digests: list[list[str] | None]


class Slab:
    """One shared, page-aligned buffer, optionally pinned for CUDA copies."""

    def __init__(self, nbytes: int, *, pin: bool = False) -> None:
        self.nbytes = round_up(max(nbytes, PAGE_SIZE))
        self.slab_id = f"{os.getpid()}-{next(_slab_ids)}"
        self.fd = os.memfd_create(f"async-ckpt-{self.slab_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.nbytes)
            self._mmap = mmap.mmap(self.fd, self.nbytes, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.pinned = False
        self.contents: SlabContents | None = None
        self._views: tuple[tuple[Place, ...], list[torch.Tensor]] | None = None
        if pin:
            self._pin()

    def _pin(self) -> None:
        result = torch_internals.cuda_host_register(self.tensor.data_ptr(), self.nbytes)
        if result != 0:
            logger.warning("cudaHostRegister failed (%s); staging from pageable memory", result)
            return
        self.pinned = True

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    def touch(self) -> None:
        """Fault in every page now (a fresh slab's first copy would pay for it otherwise).

        A plain memset, single-threaded and without the GIL: a torch op here (zero_) would run
        on a helper thread's own OpenMP team, and libgomp, seeing more threads than CPUs from
        then on, stops spin-waiting in the training thread's parallel regions for the life of
        the process (the loop's ops ran ~15% slower with its CPUs partly idle)."""
        ctypes.memset(self.tensor.data_ptr(), 0, self.nbytes)

    def views(self, places: tuple[Place, ...]) -> list[torch.Tensor]:
        """A view at each (offset, nbytes, dtype, shape): of `dtype` and `shape`, or of bytes where
        they are None. Kept for the next save of the same places (thousands of tensors: making the
        views anew is a sizeable part of a save's blocking time)."""
        if self._views is None or self._views[0] != places:
            self._views = (places, [self._view_at(*place) for place in places])
        return self._views[1]

    def _view_at(self, offset: int, nbytes: int, dtype: torch.dtype | None, shape: torch.Size | None) -> torch.Tensor:
        view = self.view(offset, nbytes)
        return view if dtype is None or shape is None else view.view(dtype).view(shape)

    def storage(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        """A storage that starts at `offset` and aliases `nbytes` of the slab."""
        if nbytes == 0:
            return torch.UntypedStorage(0)
        return torch.frombuffer(self._mmap, dtype=torch.uint8, count=nbytes, offset=offset).untyped_storage()

    def close(self) -> None:
        if self.closed:
            return
        if self.pinned:
            torch_internals.cuda_host_unregister(self.tensor.data_ptr())
            self.pinned = False
        self._views = None
        del self.tensor
        try:
            self._mmap.close()
        except BufferError:
            # A staged state dict still views it; the mapping goes when its tensors do.
            logger.debug("slab %s still viewed at close; unmapped when the last view dies", self.slab_id)
        os.close(self.fd)
        self.fd = -1


class StagingLease:
    """One staged snapshot's claim on its slab; see the module docstring."""

    def __init__(self, pool: SlabPool, slab: Slab) -> None:
        self._pool = pool
        self.slab = slab
        self.before_reuse: Callable[[], None] | None = None  # keeps a snapshot someone still holds valid

    def hold(self) -> bool:
        """Keep the slab for a write of this snapshot; False when a later stage() already reused it."""
        return self._pool._hold(self)

    def release(self) -> None:
        """End one hold (the write is done)."""
        self._pool._release(self)


class SlabPool:
    """Reuses slabs across saves: a save of the same shape gets the same, already faulted, slab.

    At most `max_slabs` exist at once, or more while all of them together hold at most
    `budget_bytes` (small states: many saves may wait for the writer without the loop waiting);
    those beyond `max_slabs` are lent while the writer is behind and closed once it has caught up
    and no save has come for `linger_seconds` while they existed: at the next write that finishes
    or save that comes after that (or at `trim()`). A writer that falls behind again and again, as
    with saves every step, reuses them instead of faulting in new ones.
    `try_acquire` takes a free slab (one whose snapshot no write holds), preferring one `prefer`
    accepts; when every slab is being staged or written the caller waits with `wait_for_room`.
    A free slab too small for the request is replaced.
    """

    def __init__(
        self, max_slabs: int, *, pin: bool = False, budget_bytes: int = 0, linger_seconds: float = 2.0
    ) -> None:
        if max_slabs < 1:
            raise ValueError(f"max_slabs must be >= 1, got {max_slabs}")
        self._max_slabs = max_slabs
        self._budget_bytes = budget_bytes
        self._linger_seconds = linger_seconds
        self._lent_until = 0.0  # (monotonic) slabs beyond max_slabs are kept until then
        self._pin = pin
        self._free: list[Slab] = []
        self._all: dict[str, Slab] = {}
        self._leases: dict[str, StagingLease] = {}  # slab id -> its current snapshot's lease
        self._holds: dict[str, int] = {}
        self._staging: set[str] = set()
        self._newest: str | None = None  # the slab of the latest snapshot, which a repeated save may write again
        self._changed = InterruptSafeCondition()  # (a Ctrl-C never leaves it held: see interrupts.py)
        self._closed = False

    @property
    def slabs(self) -> tuple[str, ...]:
        """The ids of the slabs that exist now."""
        with self._changed:
            return tuple(self._all)

    @property
    def pinned(self) -> bool:
        """Whether slabs exist and every one is pinned (registered with CUDA)."""
        with self._changed:
            return bool(self._all) and all(slab.pinned for slab in self._all.values())

    @property
    def max_slabs(self) -> int:
        """How many slabs may exist at once."""
        return self._max_slabs

    @property
    def has_room(self) -> bool:
        """Whether another slab may be created without replacing one."""
        with self._changed:
            return len(self._all) < self._max_slabs

    def try_acquire(self, nbytes: int, prefer: Callable[[Slab], bool] | None = None) -> StagingLease | None:
        """A lease on a free slab of at least `nbytes` (one `prefer` accepts, if any) for a snapshot
        being staged now, or None when every slab is being staged or written. Never waits."""
        with self._changed:
            if self._closed:
                raise CheckpointerClosedError("the staging memory was released (the stager is closed)")
            if time.monotonic() >= self._lent_until:  # (else this save would keep them lent another while)
                self._return_lent()
            fitting = [s for s in self._free if s.nbytes >= nbytes]
            if not fitting and any(self._all[i].nbytes >= nbytes for i in self._warming()):
                return None  # a spare that fits is nearly ready: wait for it rather than fault in another
            if fitting:
                slab = min(fitting, key=lambda s: (not (prefer and prefer(s)), s.nbytes))
                self._free.remove(slab)
            else:
                # A free slab too small is replaced before one is lent beyond max_slabs: lending
                # stays for saves that find every slab busy, and a shape saved once (a small
                # first save) does not make every later save fault in a fresh slab.
                while self._free and (len(self._all) >= self._max_slabs or not self._may_create(nbytes)):
                    self._discard(self._smallest_free())
                if not self._may_create(nbytes):
                    return None
                slab = Slab(nbytes, pin=self._pin)
                self._all[slab.slab_id] = slab
                logger.debug("new staging slab %s of %d bytes", slab.slab_id, slab.nbytes)
            if len(self._all) > self._max_slabs:
                self._lent_until = time.monotonic() + self._linger_seconds
            self._supersede(slab)
            lease = StagingLease(self, slab)
            self._leases[slab.slab_id] = lease
            self._newest = slab.slab_id
            self._staging.add(slab.slab_id)
            return lease

    def _may_create(self, nbytes: int) -> bool:
        if len(self._all) < self._max_slabs:
            return True
        return sum(s.nbytes for s in self._all.values()) + nbytes <= self._budget_bytes

    def wait_for_room(self, waited: float = 0.0) -> float:
        """Wait until a write releases a slab (or 5 s pass); returns the seconds waited so far, and
        says why once the wait is noticeable."""
        started = time.monotonic()
        with self._changed:
            if (self._warming() or (not self._free and len(self._all) >= self._max_slabs)) and not self._closed:
                self._changed.wait(timeout=5.0)
        waited += time.monotonic() - started
        if waited >= 5.0 and waited - (time.monotonic() - started) < 5.0:
            logger.warning(
                "the checkpoint writer is falling behind: all %d staging buffers belong to writes still in progress, "
                "so this save has waited %.0f s for the oldest to finish. Saves come faster than the writer persists "
                "them (a slow disk, or training starving the writer of CPU). Save less often, raise max_in_flight "
                "(memory: one copy of the state each), or leave the writer a CPU core. Every checkpoint is kept",
                self._max_slabs,
                waited,
            )
        return waited

    def new_spare(self, nbytes: int, besides: Slab | None = None) -> StagingLease | None:
        """A lease on a newly created slab of `nbytes` to warm up, or None when a free slab other
        than `besides` fits already or every slab is in use. Never hands out an existing slab."""
        with self._changed:
            if self._closed or any(s.nbytes >= nbytes for s in self._free if s is not besides):
                return None
            if len(self._all) >= self._max_slabs:
                others = [s for s in self._free if s is not besides]
                if not others:
                    return None
                smallest = min(others, key=self._closing_order)
                self._free.remove(smallest)
                self._discard(smallest)
            slab = Slab(nbytes, pin=self._pin)
            self._all[slab.slab_id] = slab
            self._staging.add(slab.slab_id)
            return StagingLease(self, slab)

    def staged(self, lease: StagingLease) -> None:
        """The snapshot is complete; its slab is free for reuse unless a write holds it."""
        with self._changed:
            self._staging.discard(lease.slab.slab_id)
            self._free_if_idle(lease.slab)

    def abandon(self, lease: StagingLease) -> None:
        """Staging failed: the slab holds nothing usable."""
        with self._changed:
            lease.slab.contents = None
            if self._leases.get(lease.slab.slab_id) is lease:
                del self._leases[lease.slab.slab_id]
            self._staging.discard(lease.slab.slab_id)
            self._free_if_idle(lease.slab)

    def _hold(self, lease: StagingLease) -> bool:
        slab_id = lease.slab.slab_id
        with self._changed:
            if self._leases.get(slab_id) is not lease or lease.slab.closed:
                return False
            self._holds[slab_id] = self._holds.get(slab_id, 0) + 1
            if lease.slab in self._free:
                self._free.remove(lease.slab)
            return True

    def _release(self, lease: StagingLease) -> None:
        slab_id = lease.slab.slab_id
        with self._changed:
            if self._holds.get(slab_id, 0) > 0:
                self._holds[slab_id] -= 1
                self._free_if_idle(lease.slab, written=True)

    def _free_if_idle(self, slab: Slab, written: bool = False) -> None:
        slab_id = slab.slab_id
        if (
            slab_id in self._all
            and not self._holds.get(slab_id)
            and slab_id not in self._staging
            and slab not in self._free
        ):
            self._free.append(slab)
            if written and time.monotonic() >= self._lent_until:
                self._return_lent()
            self._changed.notify_all()

    def _return_lent(self) -> None:
        """Close the slabs beyond max_slabs if the writer has caught up (no write holds a slab)."""
        while len(self._all) > self._max_slabs and self._free and not any(self._holds.values()):
            self._discard(self._smallest_free())

    def trim(self) -> None:
        """Close the slabs lent beyond max_slabs now, if no write holds a slab (every save so far
        is written)."""
        with self._changed:
            self._return_lent()

    def _warming(self) -> list[str]:
        """The spares being readied (new_spare): staging, but holding no snapshot's lease."""
        return [slab_id for slab_id in self._staging if slab_id not in self._leases]

    def _closing_order(self, slab: Slab) -> tuple[bool, int]:
        """Free slabs close smallest first, the latest snapshot's last (a repeated save writes it again)."""
        return slab.slab_id == self._newest, slab.nbytes

    def _smallest_free(self) -> Slab:
        slab = min(self._free, key=self._closing_order)
        self._free.remove(slab)
        return slab

    def _supersede(self, slab: Slab) -> None:
        """The slab's current snapshot is about to be overwritten or unmapped: let it keep its values."""
        previous = self._leases.pop(slab.slab_id, None)
        if previous is not None and previous.before_reuse is not None:
            previous.before_reuse()

    def _discard(self, slab: Slab) -> None:
        self._supersede(slab)
        del self._all[slab.slab_id]
        self._leases.pop(slab.slab_id, None)
        self._holds.pop(slab.slab_id, None)
        slab.close()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            for slab in list(self._all.values()):
                self._discard(slab)
            self._free.clear()
            self._staging.clear()
            self._changed.notify_all()
