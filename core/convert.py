"""Converting a sharded checkpoint into one `torch.load` file, for inference or other tools."""

from __future__ import annotations

import os

from .config import CheckpointWriterConfig
from .reader import CheckpointReader
from .types import RankInfo
from .writer import CheckpointWriter


def to_torch_save(path: str, output: str, *, key: str | None = None, weights_only: bool = True) -> str:
    """Write the whole checkpoint at `path` (sharded or not, at any world size) as one file at
    `output` that plain `torch.load` reads: full, unsharded tensors, nested as they were saved.

    `key` keeps one top-level entry only (e.g. "model" for inference). Every byte is verified
    while it is read; the file appears at `output` atomically, complete, or not at all. It needs
    memory for the whole (kept) state. Returns `output`.
    """
    state, _ = CheckpointReader(RankInfo(0, 1)).read(os.fspath(path), weights_only=weights_only)
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise KeyError(f"checkpoint {os.fspath(path)!r} has no top-level key {key!r} (it has {keys})")
        state = state[key]
    writer = CheckpointWriter(CheckpointWriterConfig(layout="file"), RankInfo(0, 1))
    try:
        writer.write(os.fspath(output), state)
    finally:
        writer.close()
    return os.fspath(output)
