"""A Ctrl-C at any point where Python can raise it never leaves a lock held, a save half handed
over or a write lost. (`ctrl_c_at`, in helpers.py, sends one at a chosen point.)"""

import functools
import threading
from concurrent.futures import Future

import pytest
import torch

from core import CheckpointerConfig, CheckpointProcessConfig, make_async_checkpointer
from core.interrupts import InterruptSafeCondition, InterruptSafeEvent, InterruptSafeFuture, wait_for_futures
from tests.helpers import ctrl_c_at


def free_for_another_thread(lock) -> bool:
    """Whether a thread other than this one can take `lock` now (without waiting)."""
    taken = []

    def take() -> None:
        taken.append(lock.acquire(blocking=False))
        if taken[0]:
            lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return taken[0]


def interrupted_everywhere(make, operation, lock_of) -> int:
    """Interrupt `operation(made)` at each of its signal checks in turn (a fresh `made = make()`
    each time); assert each time that its lock is free afterwards. Returns how many points."""
    unused = make()
    points, _ = ctrl_c_at(0, functools.partial(operation, unused))
    for point in range(1, points + 1):
        made = make()
        _, interrupted = ctrl_c_at(point, functools.partial(operation, made))
        assert interrupted, f"no KeyboardInterrupt at point {point}"
        assert free_for_another_thread(lock_of(made)), f"a Ctrl-C at point {point} of {points} left the lock held"
    return points


def _set_event(event) -> None:
    event.set()


def _wait_for_set_event(event) -> None:
    event.set()
    event.wait()


def _result_of_done_future(future) -> None:
    future.set_result(1)
    future.result()


def _condition_round_trip(condition) -> None:
    with condition:
        condition.notify_all()
        condition.wait(0)


@pytest.mark.parametrize(
    ("make", "operation", "lock_of"),
    [
        (InterruptSafeEvent, _set_event, lambda event: event._condition),
        (InterruptSafeEvent, _wait_for_set_event, lambda event: event._condition),
        (InterruptSafeFuture, _result_of_done_future, lambda future: future._condition),
        (InterruptSafeCondition, _condition_round_trip, lambda condition: condition),
    ],
    ids=["event.set", "event.wait", "future.result", "condition"],
)
def test_a_ctrl_c_anywhere_in_a_wait_or_a_completion_leaves_the_lock_free(make, operation, lock_of):
    assert interrupted_everywhere(make, operation, lock_of) >= 2


def test_the_standard_event_and_future_are_what_a_ctrl_c_leaves_locked():
    """The control: the same interrupts do leave threading.Event's and Future's locks held (so
    the test above reaches the points where it matters)."""
    for make, operation, lock_of in [
        (threading.Event, _set_event, lambda event: event._cond),
        (Future, _result_of_done_future, lambda future: future._condition),
    ]:
        with pytest.raises(AssertionError, match="left the lock held"):
            interrupted_everywhere(make, operation, lock_of)


def test_waiting_for_futures_is_interruptible_and_returns_the_unfinished():
    done, running = InterruptSafeFuture(), InterruptSafeFuture()
    done.set_result(None)
    assert wait_for_futures([done, running], timeout=0.01) == [running]
    _, interrupted = ctrl_c_at(1, lambda: wait_for_futures([running]))
    assert interrupted
    running.set_result(None)  # (would wait for good on a lock the interrupt left held)
    assert wait_for_futures([done, running]) == []


def test_a_ctrl_c_at_any_point_of_a_save_or_its_wait_loses_no_write_and_locks_nothing(tmp_path):
    """Steady saves (the writer up, the plan cached, slabs reused), each interrupted at another of
    its signal checks, including while the caller waits for the write. Afterwards every write
    the caller holds a future of resolves, close() returns, and every file holds what was saved."""
    weights = torch.randn(1 << 12)
    saved: list[tuple[str, float, Future]] = []
    attempted: list[tuple[str, float]] = []
    step = 0

    def save_and_wait(ckpt, wait: bool) -> None:
        nonlocal step
        step += 1
        weights.add_(1)
        path = str(tmp_path / f"slot{step % 3}")
        attempted.append((path, float(weights[0])))
        _, written = ckpt.save(path, {"w": weights, "step": step})
        saved.append((path, float(weights[0]), written))
        if wait:
            written.result()

    config = CheckpointerConfig(process_config=CheckpointProcessConfig(drain_timeout_secs=120))  # (fail, not hang)
    with make_async_checkpointer(config) as ckpt:
        for _ in range(3):
            save_and_wait(ckpt, wait=True)
        points, _ = ctrl_c_at(0, lambda: save_and_wait(ckpt, wait=True))
        assert points > 100, "the save ran fewer signal checks than expected: the profile saw nothing"
        interrupted = 0
        for point in range(1, points + 1):
            _, hit = ctrl_c_at(point, functools.partial(save_and_wait, ckpt, point % 2 == 0))
            interrupted += hit
        assert interrupted >= points // 2
        assert wait_for_futures([written for _, _, written in saved], timeout=120) == [], "a write never finished"
    # A file holds its last save the caller got a future of, or a later one that was interrupted
    # after it had been handed over (and so was written all the same).
    last = {path: (value, written) for path, value, written in saved}
    for path, (value, written) in last.items():
        assert written.exception() is None, written.exception()
        later = [v for p, v in attempted[attempted.index((path, value)) :] if p == path]
        assert float(torch.load(f"{path}/checkpoint_0.pt", weights_only=True)["w"][0]) in later, path
