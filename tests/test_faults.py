"""Faults made to happen for real: a killed trainer, fork, Ctrl-C, SIGTERM, a full disk, a long soak."""

import os
import signal

import pytest
import torch

from core import CheckpointWriteError, make_async_checkpointer, make_sync_checkpointer
from tests.helpers import (
    finish_scenario,
    rss_bytes,
    small_tmpfs,
    small_training_state,
    start_scenario,
    train_step,
    wait_until,
)

pytestmark = pytest.mark.slow  # real processes started, killed and signalled: the long tests


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _saved(trainer) -> int:
    """Wait for the trainer's "saved <writer pid>" line; returns the writer's pid."""
    line = trainer.stdout.readline()
    assert line.startswith("saved"), trainer.stderr.read()
    return int(line.split()[1])


def _assert_the_orphan_committed(trainer, writer_pid, folder, step):
    """The orphaned writer exits, having committed the save of `step` whole and printed nothing."""
    wait_until(lambda: not _alive(writer_pid), timeout=120, what="the orphaned writer to exit")
    errors = trainer.stderr.read()  # the writer shares the trainer's stderr: at end-of-file both are gone
    loaded = torch.load(folder / "checkpoint_0.pt", weights_only=True)
    assert loaded["step"] == step and torch.all(loaded["w"] == float(step))
    assert sorted(os.listdir(folder)) == ["checkpoint_0.pt", "commit.json"]
    assert "Traceback" not in errors, errors


def test_trainer_killed_after_save_still_gets_its_checkpoint(tmp_path):
    trainer = start_scenario("orphan", tmp_path)
    writer_pid = _saved(trainer)
    wait_until(lambda: (tmp_path / "reached").exists(), what="the commit to be reached")
    trainer.kill()  # SIGKILL right after save() returned, while the writer holds the commit
    trainer.wait()
    assert not (tmp_path / "ck" / "checkpoint_0.pt").exists(), "the commit was not still pending"
    (tmp_path / "gate").touch()
    _assert_the_orphan_committed(trainer, writer_pid, tmp_path / "ck", step=7)


def test_trainer_killed_while_its_writer_still_starts_still_gets_its_checkpoint(tmp_path):
    trainer = start_scenario("early_death", tmp_path)
    writer_pid = _saved(trainer)
    trainer.kill()  # the writer is still importing torch: it has not read anything yet
    trainer.wait()
    _assert_the_orphan_committed(trainer, writer_pid, tmp_path / "ck", step=5)


def test_a_forked_child_gets_a_clear_error_and_the_parent_keeps_saving(tmp_path):
    trainer = start_scenario("fork", tmp_path)
    out, errors = finish_scenario(trainer)
    assert trainer.returncode == 0 and "parent done" in out, errors
    outcome = (tmp_path / "child_outcome").read_text()
    assert outcome.startswith("refused:") and "fork" in outcome and "create a new checkpointer" in outcome.lower(), (
        outcome
    )
    assert not (tmp_path / "child").exists()
    for step in range(3):
        assert torch.load(tmp_path / f"after_{step}" / "checkpoint_0.pt", weights_only=True)["w"][0] == step


def test_ctrl_c_interrupts_the_caller_at_once_and_never_breaks_the_writer(tmp_path):
    trainer = start_scenario("ctrl_c", tmp_path)
    out, errors = finish_scenario(trainer)
    assert trainer.returncode == 0, errors
    summary = dict(item.split("=") for item in out.split())
    assert int(summary["interrupts"]) == 100, out
    assert summary["deferred"] == "0", "a Ctrl-C was raised by a later call instead of at once"
    assert summary["died"] == "0", f"a Ctrl-C broke the channel to the writer: {errors[-2000:]}"
    assert int(summary["in_save"]) >= 1, "no interrupt landed inside a save: the test tested nothing"
    # Slabs the trainer closed are unmapped by the writer even when the request that says so is
    # skipped (superseded): they once piled up, one descriptor each, until the process ran out.
    assert int(summary["writer_fds"]) <= 32, out
    assert "UnpicklingError" not in errors and "Traceback" not in errors, errors[-2000:]


def _terminate_while_draining(trainer, tmp_path):
    """SIGTERM the trainer while its commit is held, open the gate once the drain has begun."""
    assert trainer.stdout.readline().startswith("saved"), trainer.stderr.read()
    wait_until(lambda: (tmp_path / "reached").exists(), what="the held commit")
    trainer.send_signal(signal.SIGTERM)
    for line in trainer.stderr:  # the drain announces itself before it waits
        if "SIGTERM: waiting" in line:
            break
    (tmp_path / "gate").touch()
    _, errors = finish_scenario(trainer, timeout=120)
    assert trainer.returncode == 0, errors


def test_sigterm_drains_pending_writes_then_runs_the_previous_handler(tmp_path):
    _terminate_while_draining(start_scenario("sigterm", tmp_path), tmp_path)
    # The user's handler ran after the drain: it saw the committed file.
    assert (tmp_path / "user_handler_ran").read_text() == "True"
    assert torch.all(torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)["w"] == 3.0)


def test_sigterm_publishes_a_pending_accelerate_checkpoint_first(tmp_path):
    _terminate_while_draining(start_scenario("accelerate_sigterm", tmp_path), tmp_path)
    seen = (tmp_path / "user_handler_ran").read_text()
    assert "random_states_0.pkl" in seen and "model.safetensors" in seen, seen


@pytest.fixture
def tiny_filesystem(tmp_path):
    with small_tmpfs(tmp_path, "2m") as mount_point:
        yield mount_point


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(tiny_filesystem):
    with make_async_checkpointer() as ckpt:
        ckpt.save(tiny_filesystem / "ck", {"w": torch.ones(1000), "version": 1})[1].result()
        _, written = ckpt.save(tiny_filesystem / "ck", {"w": torch.ones(1 << 20), "version": 2})  # 4 MiB
        with pytest.raises(CheckpointWriteError) as info:
            written.result()
        message = str(info.value)
        assert "No space left on device" in message and str(tiny_filesystem / "ck" / "checkpoint_0.pt") in message
        assert ckpt.load(tiny_filesystem / "ck")["version"] == 1
        assert sorted(os.listdir(tiny_filesystem / "ck")) == ["checkpoint_0.pt", "commit.json"], (
            "temporary files left behind"
        )


class _CheckTemporaryIsPrivate:
    def __init__(self):
        self.modes = []

    def pre_commit(self, path, **kwargs):
        for folder in os.listdir(path):
            if folder.endswith(".tmp"):
                self.modes.append(os.stat(os.path.join(path, folder)).st_mode & 0o777)
                for name in os.listdir(os.path.join(path, folder)):
                    self.modes.append(os.stat(os.path.join(path, folder, name)).st_mode & 0o777)

    def post_commit(self, path, **kwargs):
        pass


def test_temporary_files_are_private_until_commit(tmp_path):
    hook = _CheckTemporaryIsPrivate()
    with make_sync_checkpointer(commit_hook=hook) as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.ones(3)})
    assert hook.modes == [0o700, 0o600]


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_soak_hundreds_of_saves_while_training_mutates(tmp_path):
    """Every committed checkpoint holds exactly the values of its save; resources stay flat."""
    model, optimizer = small_training_state()
    weights = torch.zeros(1 << 16)
    expected = {}
    with make_async_checkpointer() as ckpt:
        for _ in range(20):  # warm up allocators and the writer
            ckpt.save(tmp_path / "warm", {"w": weights, "model": model.state_dict()})[1].result()
        fds, rss = _fd_count(), rss_bytes()
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
        ckpt.wait()  # (staging memory lent for saves still in flight goes back when they are written)
        assert _fd_count() <= fds + 2, "file descriptors leaked"
        assert rss_bytes() - rss < 64 << 20, "memory grew during the soak"


def test_keys_never_become_paths(tmp_path):
    target = tmp_path / "run" / "ck"
    with make_sync_checkpointer() as ckpt:
        ckpt.save(target, {"../../escape": torch.ones(2), "/abs/path": torch.zeros(1), "a/../../b": 3})
        loaded = ckpt.load(target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint_0.pt", "ck", "commit.json", "run"]
    assert torch.equal(loaded["../../escape"], torch.ones(2)) and loaded["a/../../b"] == 3
