"""Page-aligned host memory that the trainer and the writer process both map.

A slab is an anonymous memory file (`memfd_create`): it has no name under /dev/shm, so
nothing can leak there, and the kernel frees it once the last process that maps it or holds
its descriptor is gone, whether that process closed it, raised, or was killed. The writer
process receives the descriptor over its pipe (SCM_RIGHTS) and maps the same pages.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import threading
from typing import Callable

import torch

from .plan import PAGE_SIZE, round_up

logger = logging.getLogger(__name__)

_slab_ids = itertools.count()


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
        # (plan layout, per-storage digests) of what the slab holds, for incremental saves; None: unknown
        self.contents: tuple[tuple, list] | None = None
        if pin:
            self._pin()

    def _pin(self) -> None:
        result = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0)
        if int(result) != 0:
            logger.warning("cudaHostRegister failed (%s); staging from pageable memory", result)
            return
        self.pinned = True

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False
        del self.tensor
        try:
            self._mmap.close()
        except BufferError:
            # A tensor handed out by view() is still alive; the mapping goes when it does.
            logger.debug("slab %s still viewed at close; unmapped when the last view dies", self.slab_id)
        os.close(self.fd)
        self.fd = -1



class SlabPool:
    """Reuses slabs across saves: a save of the same shape gets the same, already faulted, slab.

    At most `max_slabs` exist at once; `acquire` blocks while all are busy (each in-flight
    save holds one until its write finishes). A free slab too small for the request is
    replaced, so a state dict that grows does not keep the old slab around.
    """

    def __init__(self, max_slabs: int, *, pin: bool = False) -> None:
        if max_slabs < 1:
            raise ValueError(f"max_slabs must be >= 1, got {max_slabs}")
        self._max_slabs = max_slabs
        self._pin = pin
        self._free: list[Slab] = []
        self._busy: set[str] = set()
        self._all: dict[str, Slab] = {}
        self._changed = threading.Condition()
        self.on_discard: list = []  # callbacks(slab_id) run when a slab is released for good

    def acquire(self, nbytes: int, timeout: float | None = None, prefer: Callable[[Slab], bool] | None = None) -> Slab:
        """A free slab of at least `nbytes` (one `prefer` accepts, if any), waiting up to `timeout` s."""
        with self._changed:
            while True:
                fitting = [s for s in self._free if s.nbytes >= nbytes]
                if fitting:
                    slab = min(fitting, key=lambda s: (not (prefer and prefer(s)), s.nbytes))
                    self._free.remove(slab)
                    break
                if len(self._all) >= self._max_slabs and self._free:
                    self._discard(self._free.pop(0))
                if len(self._all) < self._max_slabs:
                    slab = Slab(nbytes, pin=self._pin)
                    self._all[slab.slab_id] = slab
                    logger.debug("new staging slab %s of %d bytes", slab.slab_id, slab.nbytes)
                    break
                if not self._changed.wait(timeout):
                    raise TimeoutError(f"no staging buffer became free within {timeout} s")
            self._busy.add(slab.slab_id)
            return slab

    def release(self, slab: Slab) -> None:
        with self._changed:
            if slab.slab_id in self._busy:
                self._busy.discard(slab.slab_id)
                self._free.append(slab)
                self._changed.notify_all()

    def _discard(self, slab: Slab) -> None:
        del self._all[slab.slab_id]
        for callback in self.on_discard:
            callback(slab.slab_id)
        slab.close()

    def close(self) -> None:
        with self._changed:
            for slab in list(self._all.values()):
                self._discard(slab)
            self._free.clear()
            self._busy.clear()
