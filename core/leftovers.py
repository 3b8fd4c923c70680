"""What our processes leave in checkpoint folders while they work, and its removal once they die.

Every hidden entry async-ckpt creates next to checkpoints carries an owner token: this machine
(a hash of its host name), the process id and the process's start time. While the owner lives
the entry is its work in progress; once it is dead (killed together with its writer, say) the
entry is junk. `sweep` removes junk whose owner ran on this machine and is gone; entries of
other machines (a shared filesystem) are left alone, because their owners' lives cannot be
seen from here. `find` lists every such entry with its size, for `ls`.

The entries: a writer's temporary folder (`.async-ckpt-<token>-<id>.tmp`), retention's trash
(`.async_ckpt_trash.<token>.<name>`) and the markers of saves in progress
(`.async_ckpt_saving.<hash>-<token>`, see pending.py), plus the
Accelerate hook's staging folders (`<token>-...` inside `.async_ckpt_pending/`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

logger = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".async-ckpt-"
TRASH_PREFIX = ".async_ckpt_trash."
PENDING_DIR = ".async_ckpt_pending"
MARKER_PREFIX = ".async_ckpt_saving."
PUBLISHING_SUFFIX = ".publishing"  # a multi-file publish in progress (see accelerate_ckpt/publish.py)

_TOKEN = r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)"
_PATTERNS = (
    re.compile(re.escape(MARKER_PREFIX) + r"[0-9a-f]{16}-" + _TOKEN + r"$"),
    re.compile(re.escape(TEMPORARY_PREFIX) + _TOKEN + r"-[0-9a-f]+\.tmp$"),
    re.compile(re.escape(TRASH_PREFIX) + _TOKEN + r"\..+$"),
    re.compile(_TOKEN + r"-.+$"),  # inside .async_ckpt_pending/
)
# Temporaries of async-ckpt before owner tokens: `.async-ckpt-<pid>-<id>.tmp`, of this machine.
_OLD_TEMPORARY = re.compile(re.escape(TEMPORARY_PREFIX) + r"(?P<pid>\d+)-[0-9a-f]{12}\.tmp$")


@functools.cache
def _host() -> str:
    return xxhash.xxh3_64_hexdigest(socket.gethostname().encode())[:8]


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), None when no such process runs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == b"Z":  # a zombie has finished its work
        return None
    return int(fields[19])


@functools.cache
def _boot_time() -> float:
    with open("/proc/stat") as stat:
        return float(next(line.split()[1] for line in stat if line.startswith("btime")))


def process_started_at() -> float:
    """When this process started (seconds since the epoch)."""
    return _boot_time() + (_start_time(os.getpid()) or 0) / os.sysconf("SC_CLK_TCK")


@functools.cache
def _own_token(pid: int) -> str:
    return f"{_host()}-{pid}-{_start_time(pid) or 0}"


def owner_token() -> str:
    """This process's token: machine, pid and start time (unique on a machine until it reboots)."""
    return _own_token(os.getpid())


def owner_alive(name: str) -> bool | None:
    """Whether the process that owns the entry `name` still runs: None when it is not ours or
    ran on another machine, so its life cannot be known here."""
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if match:
            if match["host"] != _host():
                return None
            return _start_time(int(match["pid"])) == int(match["start"])
    old = _OLD_TEMPORARY.match(name)
    if old:
        return _start_time(int(old["pid"])) is not None
    return None


def is_ours(name: str) -> bool:
    """Whether `name` is an entry async-ckpt creates beside checkpoints (see the module docstring)."""
    return name.startswith((TEMPORARY_PREFIX, TRASH_PREFIX, MARKER_PREFIX)) or name == PENDING_DIR


@dataclass(frozen=True)
class Leftover:
    """An entry of ours in a checkpoint folder: its path, bytes and whether its owner still runs."""

    path: str
    nbytes: int
    owner_alive: bool | None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def find(directory: str) -> list[Leftover]:
    """Our entries in `directory` (and in its `.async_ckpt_pending/`), with their sizes."""
    found: list[Leftover] = []
    for name in _listing(directory):
        path = os.path.join(directory, name)
        if name == PENDING_DIR:
            found.extend(
                Leftover(os.path.join(path, n), _size(os.path.join(path, n)), owner_alive(n)) for n in _listing(path)
            )
        elif is_ours(name):
            found.append(Leftover(path, _size(path), owner_alive(name)))
    return found


_swept: set[str] = set()


def sweep(directory: str, once: bool = True) -> None:
    """Remove our entries in `directory` whose owner ran on this machine and is dead.

    With `once`, a folder is swept at most once per process (saves into it come often)."""
    key = os.path.realpath(directory)
    if once and key in _swept:
        return
    _swept.add(key)
    for leftover in find(directory):
        # A dead publish's marker says the folder mixes two saves; only a complete publish removes it.
        if leftover.owner_alive is False and not leftover.name.endswith(PUBLISHING_SUFFIX):
            _remove(leftover.path)
    pending = os.path.join(directory, PENDING_DIR)
    try:
        os.rmdir(pending)  # only when empty
    except OSError:
        pass


def new_temporary_folder(directory: str) -> str:
    """A private folder in `directory` for one file being written, named after this process:
    if it dies, the next save into `directory` removes the folder (see `sweep`)."""
    sweep(directory)
    temporary = os.path.join(directory, f"{TEMPORARY_PREFIX}{owner_token()}-{uuid.uuid4().hex[:12]}.tmp")
    os.mkdir(temporary, 0o700)
    return temporary


def sweep_around(paths: Sequence[str]) -> None:
    """Sweep (see `sweep`) the folders that writes to `paths` put their temporaries in: each
    path's folder, and the path itself where it is a folder (a directory checkpoint)."""
    for path in paths:
        for directory in {os.path.dirname(path) or ".", path}:
            if os.path.isdir(directory):
                sweep(directory, once=False)


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        logger.info("removed %s, left by a process that died", path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot remove %s, left by a process that died: %s", path, exc)


def _listing(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _size(path: str) -> int:
    """Bytes under `path` (a file or a folder), counting what can be read; never raises."""
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            return os.lstat(path).st_size
    except OSError:
        return 0
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total
