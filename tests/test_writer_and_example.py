"""Commit hooks and permissions, the CUDA staging path, and the README's main job."""

import os
import subprocess
import sys

import pytest
import torch

from core import (
    CheckpointerConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
    DefaultStager,
    WriterHook,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from tests.helpers import REPO


class RecordingHook(WriterHook):
    def __init__(self):
        self.events = []

    def pre_commit(self, path, **kwargs):
        self.events.append(("pre", os.path.exists(os.path.join(path, "checkpoint_0.pt")), kwargs))

    def post_commit(self, path, **kwargs):
        self.events.append(("post", os.path.exists(os.path.join(path, "checkpoint_0.pt")), kwargs))


def test_hooks_run_around_the_commit(tmp_path):
    hook = RecordingHook()
    with make_sync_checkpointer(commit_hook=hook) as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.ones(2)}, step=5)
    assert hook.events == [("pre", False, {"step": 5}), ("post", True, {"step": 5})]


def test_committed_file_has_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with make_sync_checkpointer() as ckpt:
            ckpt.save(tmp_path / "ck", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "ck" / "checkpoint_0.pt").st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path / "ck")) == ["checkpoint_0.pt", "commit.json"]
    assert os.stat(tmp_path / "ck" / "commit.json").st_mode & 0o777 == 0o644


def test_checksums_can_be_turned_off(tmp_path):
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(checksums=False))
    with make_async_checkpointer(config) as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.arange(10)})[1].result()
        assert torch.equal(ckpt.load(tmp_path / "ck")["w"], torch.arange(10))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="layout"):
        CheckpointWriterConfig(layout="flat")
    with pytest.raises(ValueError, match="max_in_flight"):
        CheckpointStagerConfig(max_in_flight=0)
    if not torch.accelerator.is_available():
        with pytest.raises(AssertionError, match="use_non_blocking_copy"):  # what torch's DefaultStager raises
            DefaultStager(CheckpointStagerConfig(use_non_blocking_copy=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stage_through_pinned_memory(tmp_path):
    state = {"w": torch.randn(1 << 20, device="cuda"), "cpu": torch.ones(3)}
    expected = {k: v.cpu().clone() for k, v in state.items()}
    with make_async_checkpointer() as ckpt:
        staged, written = ckpt.save(tmp_path / "ck", state)
        staged.result()
        state["w"].zero_()
        written.result()
        assert ckpt.stager.pool.pinned
        loaded = ckpt.load(tmp_path / "ck")
    assert torch.equal(loaded["w"], expected["w"]) and torch.equal(loaded["cpu"], expected["cpu"])


def _run_example(script, tmp_path, *args):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", script), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_core_example_runs(tmp_path):
    out = _run_example("finetune_core.py", tmp_path, "--steps", "4", "--every", "2", "--width", "64")
    assert "weights identical to the live model: True" in out
    assert "async" in out and "sync" in out


@pytest.mark.slow
def test_lightning_main_job_example_runs(tmp_path):
    out = _run_example(
        "finetune_lightning.py", tmp_path, "--epochs", "1", "--width", "32", "--samples", "128", "--every", "2"
    )
    assert "median block" in out and "resumed from last.ckpt" in out
    assert "last.ckpt" in os.listdir(tmp_path / "async")


@pytest.mark.slow
def test_accelerate_example_runs(tmp_path):
    out = _run_example(
        "finetune_accelerate.py", tmp_path, "--epochs", "1", "--width", "32", "--samples", "128", "--every", "2"
    )
    assert "median block" in out and "resumed with load_state()" in out
    assert len(os.listdir(tmp_path / "on" / "checkpoints")) == 3


@pytest.mark.slow
def test_sharded_example_trains_on_two_processes_and_resumes_on_one(tmp_path):
    out = _run_example("finetune_sharded.py", tmp_path, "--steps", "4", "--every", "2", "--width", "32")
    assert "[2 ranks] 2 sharded saves" in out and "[1 process] resumed step_00004 (step 4)" in out
    assert "[1 process] step 6" in out
