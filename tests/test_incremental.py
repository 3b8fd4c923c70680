"""Incremental saves on a frozen-backbone fine-tune: unchanged tensors are neither copied nor
rewritten, and every checkpoint still loads on its own with plain torch.load.

Most tests force copy_unchanged="always" so that the copy from the previous file runs on any
filesystem (this machine's ext4 cannot share extents)."""

import os

import torch

from core import (
    CheckpointerConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
    RetentionConfig,
    make_async_checkpointer,
)
from core.fsutil import filesystem_clones
from tests.helpers import assert_same

BACKBONE_BYTES = 1024 * 1024 * 4 + 1024 * 4  # Linear(1024, 1024) weight and bias, float32


class FrozenBackboneModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Linear(1024, 1024)
        self.head = torch.nn.Linear(1024, 4)
        self.backbone.requires_grad_(False)

    def step(self, optimizer):
        self.head(torch.relu(self.backbone(torch.randn(8, 1024)))).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _incremental(copy_unchanged="always", **writer):
    return CheckpointerConfig(
        staging_config=CheckpointStagerConfig(incremental=True),
        writer_config=CheckpointWriterConfig(copy_unchanged=copy_unchanged, **writer),
    )


def _state(model, optimizer, step):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}


def test_frozen_backbone_is_neither_copied_nor_rewritten(tmp_path):
    model = FrozenBackboneModel()
    # fused AdamW updates the head without bumping tensors' version counters: contents are what count
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2, fused=True)
    results = []
    with make_async_checkpointer(_incremental()) as ckpt:
        for step in range(4):
            model.step(optimizer)
            if step == 2:
                model.backbone.weight.data[0, 0] += 1.0  # no version bump either
            state = _state(model, optimizer, step)
            expected = {"model": type(state["model"])((k, v.clone()) for k, v in state["model"].items())}
            results.append(ckpt.save(tmp_path / f"step_{step}", state)[1].result())
            loaded = torch.load(tmp_path / f"step_{step}" / "checkpoint_0.pt", weights_only=True)
            assert_same(loaded["model"], expected["model"])
            assert loaded["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0
    total = results[0].nbytes
    assert [r.copied_nbytes for r in results][0] == total and results[0].reused_nbytes == 0
    for unchanged in (results[1], results[3]):  # only the head and its optimizer state move
        assert unchanged.copied_nbytes == total - BACKBONE_BYTES
        assert unchanged.reused_nbytes == BACKBONE_BYTES
    # step 2 changed one backbone weight: the weight is copied and written again, its bias is not
    assert results[2].copied_nbytes == total - 1024 * 4 and results[2].reused_nbytes == 1024 * 4


def test_unchanged_chunks_are_copied_only_where_the_filesystem_clones(tmp_path):
    model = FrozenBackboneModel()
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    model.step(optimizer)
    with make_async_checkpointer(_incremental(copy_unchanged="auto")) as ckpt:
        ckpt.save(tmp_path / "step_0", _state(model, optimizer, 0))[1].result()
        model.step(optimizer)
        second = ckpt.save(tmp_path / "step_1", _state(model, optimizer, 1))[1].result()
    # On ext4 or tmpfs a kernel copy would read and write the bytes again: they come from the
    # snapshot instead. On XFS or btrfs the file shares the previous one's extents.
    assert second.reused_nbytes == (BACKBONE_BYTES if filesystem_clones(str(tmp_path)) else 0)
    assert second.copied_nbytes == second.nbytes - BACKBONE_BYTES, "the snapshot skips the backbone either way"
    assert_same(torch.load(tmp_path / "step_1" / "checkpoint_0.pt", weights_only=True)["model"], model.state_dict())


def test_reuse_survives_retention_and_restarts_after_a_failed_save(tmp_path):
    model = FrozenBackboneModel()
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    (tmp_path / "not_a_directory").write_text("")
    with make_async_checkpointer(_incremental(retention=RetentionConfig(keep_last=1, series="run"))) as ckpt:
        model.step(optimizer)  # the optimizer has its state: every save below has the same shape
        ckpt.save(tmp_path / "step_0", _state(model, optimizer, 0))[1].result()
        model.step(optimizer)
        # keep_last=1 deleted step_0 after step_1 committed; step_1 still reused its backbone
        second = ckpt.save(tmp_path / "step_1", _state(model, optimizer, 1))[1].result()
        assert second.reused_nbytes == BACKBONE_BYTES and not (tmp_path / "step_0").exists()

        failed = ckpt.save(tmp_path / "not_a_directory" / "step_2", _state(model, optimizer, 2), report_errors=False)[1]
        assert failed.exception() is not None
        model.step(optimizer)
        # the save before this one failed, so there is no file to copy from: everything is written
        third = ckpt.save(tmp_path / "step_3", _state(model, optimizer, 3))[1].result()
        assert third.reused_nbytes == 0 and third.copied_nbytes < third.nbytes
        unchanged = ckpt.save(tmp_path / "step_3_again", _state(model, optimizer, 3))[1].result()
        assert unchanged.copied_nbytes == 0 and unchanged.reused_nbytes == unchanged.nbytes
        model.step(optimizer)
        fourth = ckpt.save(tmp_path / "step_4", _state(model, optimizer, 4))[1].result()
        assert fourth.reused_nbytes == BACKBONE_BYTES
    loaded = torch.load(tmp_path / "step_4" / "checkpoint_0.pt", weights_only=True)
    assert_same(loaded["model"], model.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["latest", "not_a_directory", "step_4"]
