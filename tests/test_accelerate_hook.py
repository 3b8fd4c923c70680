"""The Accelerate adapter with a real Accelerator on CPU."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType

from accelerate_ckpt import ENV_FLAG, async_checkpointing_enabled, enable_async_checkpointing
from accelerate_ckpt.save_state import PENDING_DIR, unsupported_reason
from core import CheckpointWriteError
from tests.accelerate_helpers import next_draws, setup, snapshot, train
from tests.helpers import SlowCommit, assert_same
from tests.unwritable import unwritable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flag_parsing(monkeypatch):
    monkeypatch.delenv(ENV_FLAG, raising=False)
    assert async_checkpointing_enabled() is True
    for value in ("1", "true", "YES", " on "):
        monkeypatch.setenv(ENV_FLAG, value)
        assert async_checkpointing_enabled() is True
    for value in ("0", "false", "No", "off"):
        monkeypatch.setenv(ENV_FLAG, value)
        assert async_checkpointing_enabled() is False
    monkeypatch.setenv(ENV_FLAG, "maybe")
    with pytest.raises(ValueError, match=ENV_FLAG):
        async_checkpointing_enabled()
    assert async_checkpointing_enabled(True) is True  # an explicit argument wins over the variable
    with pytest.raises(TypeError):
        async_checkpointing_enabled("yes")


def test_flag_off_leaves_accelerate_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_FLAG, "0")
    accelerator, *_ = setup()
    handle = enable_async_checkpointing(accelerator)
    assert "save_state" not in vars(accelerator) and accelerator.save_state.__func__ is Accelerator.save_state
    handle.wait()
    handle.close()


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_round_trip_matches_accelerates_own_save(tmp_path, safe_serialization):
    accelerator, models, optimizers, schedulers, counter = setup(n_models=2)
    train(accelerator, models, optimizers, schedulers, counter)
    expected = copy.deepcopy(snapshot(models, optimizers, schedulers, counter))

    accelerator.save_state(tmp_path / "own", safe_serialization=safe_serialization)
    own_draws = next_draws()
    handle = enable_async_checkpointing(accelerator, commit_hook=SlowCommit(0.2))
    accelerator.load_state(tmp_path / "own")  # same RNG state for the async save
    accelerator.save_state(tmp_path / "async", safe_serialization=safe_serialization)
    assert not (tmp_path / "async").exists(), "the checkpoint was visible before it was complete"
    train(accelerator, models, optimizers, schedulers, counter)  # mutate everything while it writes
    handle.wait()
    assert sorted(os.listdir(tmp_path / "async")) == sorted(os.listdir(tmp_path / "own"))
    names = sorted(os.listdir(tmp_path / "async"))
    assert ("model.safetensors" in names and "model_1.safetensors" in names) == safe_serialization
    assert ("pytorch_model.bin" in names and "pytorch_model_1.bin" in names) != safe_serialization
    assert {"optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin", "random_states_0.pkl",
            "custom_checkpoint_0.pkl"} <= set(names)
    assert PENDING_DIR not in os.listdir(tmp_path)

    accelerator.load_state(tmp_path / "async")  # stock load_state reads the async files
    assert_same(snapshot(models, optimizers, schedulers, counter), expected)
    _assert_same_draws(next_draws(), own_draws)
    handle.close()
    assert "save_state" not in vars(accelerator)


def _assert_same_draws(a, b):
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]), (a, b)


def test_automatic_naming_with_total_limit(tmp_path):
    accelerator, models, optimizers, schedulers, counter = setup(
        project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2
    )
    handle = enable_async_checkpointing(accelerator, commit_hook=SlowCommit(0.1))
    saved = []
    for i in range(5):
        train(accelerator, models, optimizers, schedulers, counter, steps=1)
        saved.append(copy.deepcopy(snapshot(models, optimizers, schedulers, counter)))
        path = accelerator.save_state()
        assert path.name == f"checkpoint_{i}"
        # Only complete checkpoints are ever listed where load_state() looks for the latest one.
        for folder in os.listdir(tmp_path / "checkpoints"):
            try:
                files = os.listdir(tmp_path / "checkpoints" / folder)
            except FileNotFoundError:
                continue  # pruned since the listing: it leaves in one rename, never half-deleted
            assert "random_states_0.pkl" in files and "optimizer.bin" in files, (folder, files)
    train(accelerator, models, optimizers, schedulers, counter)
    accelerator.load_state()  # drains, then picks the newest: checkpoint_4
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_3", "checkpoint_4"]
    assert_same(snapshot(models, optimizers, schedulers, counter), saved[-1])
    accelerator.end_training()
    handle.close()


class _RecordingTracker(GeneralTracker):
    """An Accelerate tracker that keeps what it is given."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def tracker(self):
        return self.logged

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        self.logged.append(dict(values))


def test_checkpoint_costs_reach_the_accelerate_trackers(tmp_path):
    tracker = _RecordingTracker()
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("test")
    model = accelerator.prepare(torch.nn.Linear(64, 64))
    handle = enable_async_checkpointing(accelerator)
    for step in range(3):
        accelerator.save_state(str(tmp_path / f"step_{step}"))
    accelerator.end_training()  # drains, then logs the last commit before the trackers finish
    assert handle.stats.saves == 3
    assert [set(values) >= {"checkpoint/blocking_s", "checkpoint/persist_s"} for values in tracker.logged] == [True] * 3
    assert tracker.logged[-1]["checkpoint/size_mb"] == handle.stats.last.nbytes / 1e6 > 0.016
    handle.close()
    del model


def test_unwritable_target_is_a_clear_error_at_save(tmp_path):
    accelerator, *_ = setup()
    handle = enable_async_checkpointing(accelerator)
    target = tmp_path / "out"
    target.mkdir()
    try:
        with unwritable(target):
            with pytest.raises(PermissionError, match="out"):
                accelerator.save_state(target / "ckpt")
        assert not (target / "ckpt").exists()
        accelerator.save_state(target / "ckpt")  # works again once the directory is writable
        handle.wait()
        assert "optimizer.bin" in os.listdir(target / "ckpt")
    finally:
        handle.close()


class FailingCommit:
    """A picklable commit hook that fails in the writer process, as a failing upload would."""

    def pre_commit(self, path, **kwargs):
        raise OSError(f"upload of {os.path.basename(path)} failed")

    def post_commit(self, path, **kwargs):
        pass


def test_background_write_failure_surfaces_and_publishes_nothing(tmp_path):
    accelerator, *_ = setup()
    handle = enable_async_checkpointing(accelerator, commit_hook=FailingCommit())
    try:
        accelerator.save_state(tmp_path / "ckpt")
        with pytest.raises(CheckpointWriteError, match="upload of .* failed"):
            accelerator.load_state(tmp_path / "ckpt")
        assert sorted(os.listdir(tmp_path)) == [], "a failed checkpoint left files behind"
        handle.wait()  # reported once
    finally:
        handle.close()


def test_unsupported_setups_fall_back_with_a_warning():
    accelerator, *_ = setup()
    assert unsupported_reason(accelerator) is None
    for distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        accelerator.state.distributed_type = distributed_type
        try:
            assert unsupported_reason(accelerator) is not None
            with pytest.warns(UserWarning, match="stays synchronous"):
                handle = enable_async_checkpointing(accelerator, enabled=True)
            assert "save_state" not in vars(accelerator)
            handle.close()
        finally:
            accelerator.state.distributed_type = DistributedType.NO


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_accelerate_launch(tmp_path):
    """`accelerate launch --multi_gpu` starts torchrun; with cpu=True the ranks use gloo on CPU."""
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         os.path.join(REPO, "tests", "accelerate_launch_script.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "ACCELERATE_ASYNC_CHECKPOINT": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert "random_states_0.pkl" in names and "random_states_1.pkl" in names
    for rank in (0, 1):
        assert (tmp_path / f"rng_ok_{rank}").exists()
