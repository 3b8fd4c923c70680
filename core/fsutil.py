"""Byte and filesystem helpers that every other module may use (this module imports no other)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import tempfile
from collections.abc import Sequence

import torch

PAGE_SIZE = 4096
DEFAULT_CHUNK_BYTES = 64 << 20


def round_up(value: int, multiple: int = PAGE_SIZE) -> int:
    return (value + multiple - 1) // multiple * multiple


def buffer_of(byte_view: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor's bytes (it must outlive the view)."""
    if byte_view.numel() == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * byte_view.numel()).from_address(byte_view.data_ptr())).cast("B")


def write_all(fd: int, view: memoryview | bytes, offset: int) -> None:
    """pwrite every byte of `view` at `offset`, however many calls it takes."""
    view = memoryview(view)
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_gathered(fd: int, buffers: Sequence[memoryview | bytes], offset: int) -> None:
    """Write `buffers` back to back from `offset`, in as few pwritev calls as the kernel allows."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    limit = os.sysconf("SC_IOV_MAX")
    first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first : first + limit], offset)
        offset += written
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


def fsync_directory(directory: str) -> None:
    """Make the entries of `directory` (renames, new files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """The process's umask, read without changing it (Linux 4.7+ shows it in /proc/self/status).
    Files take their final permissions from it when they are published, as open() would give them."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    # Older kernels: reading it means setting it; put it back at once (a race only with another
    # thread that changes the umask at the same moment).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolved(path: str | os.PathLike[str]) -> str:
    """One spelling for every way of naming a path: absolute, symlinks and `..` resolved."""
    text = os.fspath(path)
    if not text:
        raise ValueError("a checkpoint path must not be empty")
    return os.path.realpath(os.path.abspath(os.path.expanduser(text)))


FICLONE = 0x40049409  # _IOW(0x94, 9, int): clone a whole file's extents (Linux)
_clones_on_device: dict[int, bool] = {}


def filesystem_clones(directory: str) -> bool:
    """Whether files in `directory` can share extents (XFS, btrfs, ...): probed once per filesystem
    by cloning a one-page file. Copies between files there cost no data writes."""
    device = os.stat(directory).st_dev
    if device not in _clones_on_device:
        with tempfile.TemporaryFile(dir=directory) as source, tempfile.TemporaryFile(dir=directory) as dest:
            source.write(b"\0" * PAGE_SIZE)
            source.flush()
            try:
                fcntl.ioctl(dest.fileno(), FICLONE, source.fileno())
                _clones_on_device[device] = True
            except OSError:
                _clones_on_device[device] = False
    return _clones_on_device[device]
