"""Retention on its own: series names, what it deletes, what it keeps, the latest pointer."""

import os

import torch

from core import RetentionConfig, make_sync_checkpointer
from core.retention import apply_retention, series_of


def test_a_series_is_the_name_without_its_numbers_unless_named():
    assert series_of("ckpt/step_000120", RetentionConfig()) == "step_#"
    assert series_of("ckpt/epoch=3-step=1200.ckpt/", RetentionConfig()) == "epoch=#-step=#.ckpt"
    assert series_of("ckpt/step_1", RetentionConfig(series="run-a")) == "run-a"
    assert series_of("ckpt/step_1", None) is None


def _save_series(tmp_path, steps, retention):
    from core import CheckpointerConfig, CheckpointWriterConfig

    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(retention=retention))
    with make_sync_checkpointer(config) as ckpt:
        for step in steps:
            ckpt.save(tmp_path / f"step_{step}", {"w": torch.full((4,), float(step))}, step=step)


def test_keep_last_and_keep_every_delete_only_older_checkpoints_of_the_series(tmp_path):
    _save_series(tmp_path, range(1, 8), RetentionConfig(keep_last=2, keep_every=3))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_3", "step_6", "step_7"]
    assert os.readlink(tmp_path / "latest") == "step_7"


def test_applied_by_hand_it_deletes_nothing_outside_its_series(tmp_path):
    _save_series(tmp_path, range(3), RetentionConfig(series="mine", update_latest=False))
    _save_series(tmp_path, [10], RetentionConfig(series="theirs", update_latest=False))
    deleted = apply_retention(str(tmp_path / "step_2"), RetentionConfig(keep_last=1, series="mine"))
    assert sorted(os.path.basename(path) for path in deleted) == ["step_0", "step_1"]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_10", "step_2"]
