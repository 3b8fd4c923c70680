"""Every test is checked for leaks: no thread, child process or /dev/shm entry may outlive it."""

import os
import threading

import pytest


def _shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


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
    """Fails the test if it leaves threads, child processes or /dev/shm entries behind."""
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = _child_pids()
    shm_before = _shm_entries()
    yield
    leaked_threads = [t.name for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    assert not leaked_threads, f"threads left running: {leaked_threads}"
    assert _child_pids() - children_before == set(), "child processes left running"
    assert _shm_entries() - shm_before == set(), "shared memory segments left in /dev/shm"
