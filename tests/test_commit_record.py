"""The commit record: written atomically, read back whole, refused when damaged."""

import json
import os

import pytest

from core import COMMIT_RECORD, CommitRecord, CorruptCheckpointError, RankFile, UncommittedCheckpointError
from core.commit import read_commit_record, write_commit_record


def _record(**changes):
    record = CommitRecord(2, (RankFile(0, "checkpoint_0.pt", 10, "a"), RankFile(1, "checkpoint_1.pt", 12, "b")))
    return CommitRecord(**{**record.__dict__, **changes})


def test_a_record_round_trips_and_leaves_no_temporary(tmp_path):
    record = _record(metadata={"step": 3}, series="step_#")
    write_commit_record(str(tmp_path), record)
    assert os.listdir(tmp_path) == [COMMIT_RECORD]
    again = read_commit_record(str(tmp_path))
    assert again == record and again.file_of(1).write_id == "b"


def test_a_folder_without_a_record_is_uncommitted_and_says_so(tmp_path):
    with pytest.raises(UncommittedCheckpointError, match="no commit.json"):
        read_commit_record(str(tmp_path))


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda r: r.update(world_size=3), "one file per rank"),
        (lambda r: r["files"][0].update(rank=1), "one file per rank"),
        (lambda r: r.update(version=99), "newer"),
        (lambda r: r.update(format="other"), "format"),
        (lambda r: r["files"][1].update(nbytes=-1), "nbytes"),
        (lambda r: r.update(metadata=[1]), "metadata"),
        (lambda r: r.update(shared_filesystem="yes"), "wrong type"),
    ],
)
def test_a_record_that_does_not_describe_a_checkpoint_is_damaged(tmp_path, edit, reason):
    raw = json.loads(_record().to_json())
    edit(raw)
    (tmp_path / COMMIT_RECORD).write_text(json.dumps(raw))
    with pytest.raises(CorruptCheckpointError, match=reason):
        read_commit_record(str(tmp_path))
