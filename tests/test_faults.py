"""Faults made to happen for real: a killed trainer, SIGTERM, a full disk, a long soak."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from core import CheckpointWriteError, make_async_checkpointer, make_sync_checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(scenario, out):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "fault_scripts.py"), scenario, str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO},
    )


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_trainer_killed_after_save_still_gets_its_checkpoint(tmp_path):
    trainer = _start("orphan", tmp_path)
    line = trainer.stdout.readline()
    assert line.startswith("saved"), trainer.stderr.read()
    writer_pid = int(line.split()[1])
    trainer.kill()  # SIGKILL right after save() returned; the commit takes 1.5 s more
    trainer.wait()
    assert not (tmp_path / "ck" / "checkpoint_0.pt").exists(), "the commit was not still pending"
    deadline = time.time() + 60
    while _alive(writer_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(writer_pid), "the orphaned writer did not exit"
    loaded = torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)
    assert loaded["step"] == 7 and torch.all(loaded["w"] == 7.0)
    assert sorted(os.listdir(tmp_path / "ck")) == ["checkpoint_0.pt", "commit.json"]


def test_sigterm_drains_pending_writes_then_runs_the_previous_handler(tmp_path):
    trainer = _start("sigterm", tmp_path)
    assert trainer.stdout.readline().startswith("saved"), trainer.stderr.read()
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0, trainer.stderr.read()
    # The user's handler ran after the drain: it saw the committed file.
    assert (tmp_path / "user_handler_ran").read_text() == "True"
    assert torch.all(torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)["w"] == 3.0)


def test_sigterm_publishes_a_pending_accelerate_checkpoint_first(tmp_path):
    trainer = _start("accelerate_sigterm", tmp_path)
    assert trainer.stdout.readline().startswith("saved"), trainer.stderr.read()
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=120) == 0, trainer.stderr.read()
    seen = (tmp_path / "user_handler_ran").read_text()
    assert "random_states_0.pkl" in seen and "model.safetensors" in seen, seen


@pytest.fixture
def tiny_filesystem(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True
    ).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(tiny_filesystem):
    with make_async_checkpointer() as ckpt:
        ckpt.save(tiny_filesystem / "ck", {"w": torch.ones(1000), "version": 1})[1].result()
        _, written = ckpt.save(tiny_filesystem / "ck", {"w": torch.ones(1 << 20), "version": 2})  # 4 MiB
        with pytest.raises(CheckpointWriteError) as info:
            written.result()
        message = str(info.value)
        assert "No space left on device" in message and str(tiny_filesystem / "ck" / "checkpoint_0.pt") in message
        with pytest.raises(CheckpointWriteError):
            ckpt.wait()
        assert ckpt.load(tiny_filesystem / "ck")["version"] == 1
        assert sorted(os.listdir(tiny_filesystem / "ck")) == ["checkpoint_0.pt", "commit.json"], "temporary files left behind"


class _CheckTemporaryIsPrivate:
    def __init__(self):
        self.modes = []

    def pre_commit(self, path, **kwargs):
        for name in os.listdir(path):
            if name.endswith(".tmp"):
                self.modes.append(os.stat(os.path.join(path, name)).st_mode & 0o777)

    def post_commit(self, path, **kwargs):
        pass


def test_temporary_files_are_private_until_commit(tmp_path):
    hook = _CheckTemporaryIsPrivate()
    with make_sync_checkpointer(commit_hook=hook) as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.ones(3)})
    assert hook.modes == [0o600]


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_soak_hundreds_of_saves_while_training_mutates(tmp_path, no_leaks):
    """Every committed checkpoint holds exactly the values of its save; resources stay flat."""
    from tests.helpers import small_training_state, train_step

    model, optimizer = small_training_state()
    weights = torch.zeros(1 << 16)
    expected = {}
    with make_async_checkpointer() as ckpt:
        for step in range(20):  # warm up allocators and the writer
            ckpt.save(tmp_path / "warm", {"w": weights, "model": model.state_dict()})[1].result()
        fds, rss = _fd_count(), _rss()
        started = time.time()
        for step in range(300):
            weights.fill_(step)
            path = tmp_path / f"slot{step % 8}"
            state = {"w": weights, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
            expected[str(path)] = (step, {k: v.clone() for k, v in model.state_dict().items()})
            staged, written = ckpt.save(path, state)
            staged.result()
            train_step(model, optimizer)  # mutate while the write runs
            if step % 8 == 7:
                ckpt.wait()
                for slot, (saved_step, saved_model) in expected.items():
                    loaded = ckpt.load(slot)
                    assert loaded["step"] == saved_step and torch.all(loaded["w"] == saved_step)
                    for name, tensor in saved_model.items():
                        assert torch.equal(loaded["model"][name], tensor), (slot, name)
            assert time.time() - started < 240, "soak test ran too long"
        assert _fd_count() <= fds + 2, "file descriptors leaked"
        assert _rss() - rss < 64 << 20, "memory grew during the soak"


def test_keys_never_become_paths(tmp_path):
    target = tmp_path / "run" / "ck"
    with make_sync_checkpointer() as ckpt:
        ckpt.save(target, {"../../escape": torch.ones(2), "/abs/path": torch.zeros(1), "a/../../b": 3})
        loaded = ckpt.load(target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint_0.pt", "ck", "commit.json", "run"]
    assert torch.equal(loaded["../../escape"], torch.ones(2)) and loaded["a/../../b"] == 3
