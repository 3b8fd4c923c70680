"""Checkpoint management: find_latest after a crash, retention, the latest pointer, the CLI, telemetry."""

import json
import logging
import os
import subprocess
import sys
import threading
import zipfile

import pytest
import torch

from core import (
    CheckpointerConfig,
    CheckpointWriterConfig,
    RetentionConfig,
    find_latest,
    list_checkpoints,
    make_async_checkpointer,
    make_sync_checkpointer,
    read_latest,
)
from core.locks import reading
from tests.helpers import crash_at_the_held_commit, flip_byte, run_cli


def _state(step, frozen=None):
    return {
        "model": {"w": torch.full((1000,), float(step)), "frozen": frozen if frozen is not None else torch.ones(64)},
        "optimizer": {"lr": 0.1, "exp_avg": torch.full((1000,), step / 10)},
        "step": step,
    }


def _retaining(**retention):
    return CheckpointerConfig(writer_config=CheckpointWriterConfig(retention=RetentionConfig(**retention)))


@pytest.mark.slow
def test_find_latest_skips_a_checkpoint_whose_commit_a_crash_interrupted(tmp_path, caplog):
    crash_at_the_held_commit(tmp_path)

    with caplog.at_level(logging.WARNING, logger="core.catalog"):
        assert find_latest(tmp_path) == str(tmp_path / "step_2")
    assert "skipping checkpoint" in caplog.text and "step_3: not committed" in caplog.text
    assert read_latest(tmp_path) == str(tmp_path / "step_2"), "latest moved before a commit"
    with make_sync_checkpointer() as ckpt:
        assert torch.equal(ckpt.load(find_latest(tmp_path))["w"], torch.full((1000,), 2.0))

    listing = json.loads(run_cli("ls", tmp_path, "--json").stdout)
    assert [(r["name"], r["step"], r["complete"], r["latest"]) for r in listing] == [
        ("step_1", 1, True, False),
        ("step_2", 2, True, True),
        ("step_3", 3, False, False),
    ]
    verify = run_cli("verify", tmp_path / "step_2", tmp_path / "step_3")
    assert verify.returncode == 1 and "DAMAGED " + str(tmp_path / "step_3") + ": not committed" in verify.stdout


def test_find_latest_skips_damaged_checkpoints(tmp_path):
    with make_async_checkpointer() as ckpt:
        for step in (1, 2, 3):
            ckpt.save(tmp_path / f"step_{step}", _state(step), step=step)
    # step 3: one flipped byte in tensor data, found only by reading every byte
    flip_byte(tmp_path / "step_3" / "checkpoint_0.pt", "data/1", at=10)
    assert find_latest(tmp_path, deep=True) == str(tmp_path / "step_2")
    # step 2 truncated: found from the structure alone
    os.truncate(tmp_path / "step_2" / "checkpoint_0.pt", 5000)
    assert find_latest(tmp_path, deep=True) == str(tmp_path / "step_1")
    assert find_latest(tmp_path) == str(tmp_path / "step_3")  # shallow: tensor bytes are not read
    (tmp_path / "empty").mkdir()
    assert find_latest(tmp_path / "empty") is None


def test_retention_keeps_the_last_k_and_every_nth_and_spares_checkpoints_being_read(tmp_path):
    with make_async_checkpointer(_retaining(keep_last=2, keep_every=3)) as ckpt:
        for step in range(1, 5):
            ckpt.save(tmp_path / f"step_{step}", _state(step), step=step)[1].result()
        assert sorted(os.listdir(tmp_path)) == ["latest", "step_3", "step_4"], "step 3 kept (every 3rd), last 2 kept"
        with reading(tmp_path / "step_4"):  # a reader holds step 4 while newer ones commit
            for step in (5, 7):
                ckpt.save(tmp_path / f"step_{step}", _state(step), step=step)[1].result()
            assert sorted(os.listdir(tmp_path)) == ["latest", "step_3", "step_4", "step_5", "step_7"]
        ckpt.save(tmp_path / "step_8", _state(8), step=8)[1].result()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_3", "step_7", "step_8"]
    assert read_latest(tmp_path) == str(tmp_path / "step_8")
    assert [info.step for info in list_checkpoints(tmp_path)] == [3, 7, 8]


def test_cli_inspect_verify_and_diff(tmp_path):
    with make_async_checkpointer() as ckpt:
        ckpt.save(tmp_path / "a", _state(1), step=1)
        ckpt.save(tmp_path / "b", _state(2), step=2)
        ckpt.save(tmp_path / "a_again", _state(1), step=1)

    inspect = run_cli("inspect", tmp_path / "a", "--json")
    assert inspect.returncode == 0, inspect.stderr
    report = json.loads(inspect.stdout)
    assert report["step"] == 1 and report["complete"]
    assert {t["key"]: (t["shape"], t["dtype"], t["nbytes"]) for t in report["tensors"]} == {
        "model.w": ([1000], "float32", 4000),
        "model.frozen": ([64], "float32", 256),
        "optimizer.exp_avg": ([1000], "float32", 4000),
    }
    assert report["groups"] == {"model": {"tensors": 2, "nbytes": 4256}, "optimizer": {"tensors": 1, "nbytes": 4000}}
    assert report["values"] == {"optimizer.lr": "0.1", "step": "1"}
    table = run_cli("inspect", tmp_path / "a").stdout
    assert "model.w" in table and "(1000,)" in table and "optimizer" in table

    same = run_cli("diff", tmp_path / "a", tmp_path / "a_again", "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["changed"] == []
    different = run_cli("diff", tmp_path / "a", tmp_path / "b", "--json")
    assert different.returncode == 1
    changed = {c["key"]: c for c in json.loads(different.stdout)["changed"]}
    assert set(changed) == {"model.w", "optimizer.exp_avg", "step"}
    assert changed["model.w"]["max_abs_diff"] == 1.0 and changed["model.w"]["relative_change"] == pytest.approx(1.0)
    assert "model.w" in run_cli("diff", tmp_path / "a", tmp_path / "b").stdout

    assert run_cli("verify", tmp_path / "a", tmp_path / "b").returncode == 0
    flip_byte(tmp_path / "b" / "checkpoint_0.pt", "data/0", at=10)
    damaged = run_cli("verify", tmp_path / "a", tmp_path / "b", "--json")
    assert damaged.returncode == 1
    results = {os.path.basename(r["path"]): r for r in json.loads(damaged.stdout)}
    assert results["a"]["ok"] and not results["b"]["ok"] and "fail their checksums" in results["b"]["reason"]

    inspect_damaged = run_cli("inspect", tmp_path / "b")
    assert inspect_damaged.returncode == 0, "inspect reads no tensor bytes, so it still works"
    diff_damaged = run_cli("diff", tmp_path / "a", tmp_path / "b")
    assert diff_damaged.returncode == 1 and "fail their checksum" in diff_damaged.stderr

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for command in (("verify", tmp_path / "missing"), ("inspect", tmp_path / "notes.txt")):
        result = run_cli(*command)
        assert result.returncode == 2 and result.stderr.strip(), result
    console = os.path.join(os.path.dirname(sys.executable), "async-ckpt")
    assert subprocess.run([console, "ls", str(tmp_path)], capture_output=True, text=True).returncode == 0


def test_every_save_reports_its_costs(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="core.checkpointer"):
        with make_async_checkpointer() as ckpt:
            result = ckpt.save(tmp_path / "ck", _state(1))[1].result()
            assert ckpt.stats.saves == 1 and ckpt.stats.last is result
        with make_sync_checkpointer() as sync:
            assert sync.save(tmp_path / "sync", _state(1)) is None
            sync_result = sync.stats.last
    assert result.nbytes == sync_result.nbytes == 8256
    assert 0 < result.blocking_seconds <= result.persist_seconds and result.write_seconds > 0
    assert sync_result.blocking_seconds == sync_result.persist_seconds > 0
    assert set(result.metrics()) >= {"checkpoint/blocking_s", "checkpoint/persist_s", "checkpoint/write_gbps"}
    assert caplog.text.count("MB durable after") == 2


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_hostile_and_odd_files_are_clear_errors_everywhere(tmp_path, monkeypatch):
    """A commit record that is not an object, a pickle that claims a huge storage, a malicious
    pickle: every command says what is wrong (exit 1, no traceback) and find_latest skips them."""
    monkeypatch.chdir(tmp_path)
    with make_sync_checkpointer() as ckpt:
        ckpt.save(tmp_path / "odd_record", _state(1))
        ckpt.save(tmp_path / "good", _state(2))
    (tmp_path / "odd_record" / "commit.json").write_text('"just a string"')
    torch.save({"payload": _Exploit()}, tmp_path / "evil.pt")
    torch.save({"w": torch.ones(4)}, tmp_path / "huge.pt")
    with zipfile.ZipFile(tmp_path / "huge.pt") as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(name for name in records if name.endswith("data.pkl"))
    records[pkl] = records[pkl].replace(b"K\x04", b"\x8a\x06\x00\x00\x00\x00\x00\x01", 1)
    with zipfile.ZipFile(tmp_path / "huge.pt", "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)

    for bad in (tmp_path / "odd_record", tmp_path / "evil.pt", tmp_path / "huge.pt"):
        for command in (["verify", bad], ["inspect", bad], ["diff", bad, tmp_path / "good"]):
            result = run_cli(*command)
            assert result.returncode == 1, (command, result.stdout, result.stderr)
            said = result.stdout + result.stderr
            assert "Traceback" not in said and ("damaged" in said or "refuses" in said or "claims" in said), (
                command,
                said,
            )
    listing = run_cli("ls", tmp_path, "--json")
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr
    complete = {row["name"]: row["complete"] for row in json.loads(listing.stdout)}
    assert complete["good"] and not complete["odd_record"] and not complete["evil.pt"] and not complete["huge.pt"]
    assert find_latest(tmp_path) == str(tmp_path / "good")
    assert not (tmp_path / "pwned").exists()


def test_find_latest_while_retention_deletes_never_fails(tmp_path):
    errors = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                find_latest(tmp_path)
            except Exception as exc:
                errors.append(repr(exc))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with make_async_checkpointer(_retaining(keep_last=2)) as ckpt:
            for step in range(40):
                ckpt.save(tmp_path / f"step_{step:03d}", _state(step), step=step)[1].result()
    finally:
        stop.set()
        poller.join()
    assert errors == []
    assert find_latest(tmp_path) == str(tmp_path / "step_039")
