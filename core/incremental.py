"""The writer's side of incremental saves: the previous file of each lineage, held open.

A lineage is the run of saves of one state-dict shape (see plan.Lineage). After the writer
commits a save of a lineage, it keeps that file open; the next save of the lineage copies
every chunk whose digest is unchanged from it, inside the kernel, instead of writing the
bytes again. The descriptor keeps the file's contents reachable even if retention or a later
save to the same path removes or replaces it, so what is copied is always what was committed.
"""

from __future__ import annotations

import os

from .checkpoint_file import CheckpointFile
from .parallel_io import PreviousRecord
from .plan import Lineage


class PreviousFiles:
    """The last committed checkpoint file of each lineage, open, with its records' offsets and digests."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[int, int, dict[str, tuple[int, PreviousRecord]]]] = {}

    def records_for(self, lineage: Lineage, nbytes_by_key: dict[str, int]) -> dict[str, PreviousRecord] | None:
        """The previous file's records this save may copy from: only if that file is the save just before
        this one (a failed save in between breaks the chain), and only records of the same size."""
        held = self._files.get(lineage.name)
        if held is None or held[0] != lineage.previous:
            return None
        _, _, records = held
        return {key: record for key, (nbytes, record) in records.items() if nbytes_by_key.get(key) == nbytes}

    def remember(self, lineage: Lineage, path: str) -> None:
        """Hold the just-committed file of `lineage` for the next save; needs checksums in its manifest."""
        self._forget(lineage.name)
        with CheckpointFile(path) as ckpt:
            if not ckpt.verifiable:
                return
            assert ckpt.manifest is not None
            records = {
                key: (storage["nbytes"], ckpt.storage_offset(key), storage["digests"])
                for key, storage in ckpt.manifest["storages"].items()
            }
            fd = os.dup(ckpt.fd)  # the file whose manifest was just read, whatever replaces it later
        self._files[lineage.name] = (
            lineage.sequence,
            fd,
            {key: (nbytes, PreviousRecord(fd, offset, digests)) for key, (nbytes, offset, digests) in records.items()},
        )

    def _forget(self, name: str) -> None:
        held = self._files.pop(name, None)
        if held is not None:
            os.close(held[1])

    def close(self) -> None:
        for name in list(self._files):
            self._forget(name)
