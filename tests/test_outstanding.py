"""OutstandingWrites: failures raised once, unless seen on their future; bounded draining."""

import pytest

from core import DrainTimeoutError
from core.outstanding import OutstandingWrites, settle


def test_an_unseen_failure_is_raised_once_and_a_seen_one_never(tmp_path):
    writes = OutstandingWrites()
    unseen = writes.start(str(tmp_path / "a"))
    seen = writes.start(str(tmp_path / "b"))
    settle(unseen, error=RuntimeError("a failed"))
    settle(seen, error=RuntimeError("b failed"))
    assert isinstance(seen.exception(), RuntimeError)  # looking at it counts as seeing it
    with pytest.raises(RuntimeError, match="a failed"):
        writes.raise_unseen()
    writes.raise_unseen()  # nothing more


def test_a_failure_not_to_be_reported_stays_on_its_future(tmp_path):
    writes = OutstandingWrites()
    quiet = writes.start(str(tmp_path / "a"), report_errors=False)
    settle(quiet, error=RuntimeError("only on the future"))
    writes.raise_unseen()
    assert writes.wait(timeout=1)


def test_giving_up_fails_what_is_left_naming_each_path(tmp_path):
    writes = OutstandingWrites()
    done = writes.start(str(tmp_path / "done"))
    settle(done, result="ok")
    stuck = writes.start(str(tmp_path / "stuck"))
    assert writes.give_up_after(0.05) is False
    with pytest.raises(DrainTimeoutError, match="stuck"):
        stuck.result()
    assert writes.give_up_after(0.05) is True  # nothing left
    settle(stuck, result="late")  # a late answer changes nothing
    assert isinstance(stuck.exception(), DrainTimeoutError)
