"""Every test is checked for leaks: no thread, child process or /dev/shm entry of ours may outlive it.

Writers released into the pool of idle writers (core.writer_pool) outlive the checkpointer that
started them by design: they are the pool's, counted apart, and the session ends by releasing
them and checking that no child process is left.

/dev/shm is shared by the whole machine, so only entries our own processes made count: those
whose name carries the pid of this process or of a process a test started (torch names its
shared memory `torch_<pid>_...`), and any entry named after async-ckpt. Another program's
entries (a `sem.mp-*` semaphore of a job running beside the suite) are not ours to judge.
"""

import os
import re
import signal
import subprocess
import threading

import pytest

from core.writer_pool import idle_writer_pids, release_idle_writers

_TORCH_SHM = re.compile(r"torch_(\d+)_")
_started_pids: set[int] = set()


class _RecordingPopen(subprocess.Popen):
    """subprocess.Popen, remembering the pid of every process a test (or the library) starts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _started_pids.add(self.pid)


subprocess.Popen = _RecordingPopen  # type: ignore[misc]

# The Ctrl-C tests send real SIGINTs: they need Python's handler, which a suite started as a
# shell script's background job does not get (such a job inherits SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)


def _shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _ours(name: str, pids: set[int]) -> bool:
    match = _TORCH_SHM.match(name)
    return "async" in name.lower() or (match is not None and int(match.group(1)) in pids)


def _child_pids() -> set[int]:
    pids = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return pids


@pytest.fixture(autouse=True)
def no_leaks():
    """Fails the test if it leaves threads, child processes or /dev/shm entries of ours behind."""
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = _child_pids()
    shm_before = _shm_entries()
    yield
    leaked_threads = [t.name for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    assert not leaked_threads, f"threads left running: {leaked_threads}"
    assert _child_pids() - children_before - idle_writer_pids() == set(), "child processes left running"
    ours = {os.getpid(), *_started_pids}
    leaked_shm = {name for name in _shm_entries() - shm_before if _ours(name, ours)}
    assert not leaked_shm, f"shared memory segments left in /dev/shm: {sorted(leaked_shm)}"


@pytest.fixture(scope="session", autouse=True)
def idle_writers_are_released():
    """At the end of the session, releasing the idle writers leaves no child process."""
    yield
    release_idle_writers()
    assert _child_pids() == set(), "child processes left after releasing the idle writers"
