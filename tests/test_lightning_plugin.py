"""AsyncCheckpointIO in real Lightning Trainer runs on CPU."""

import csv as csv_module
import os
import threading

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from core import CheckpointWriteError, list_checkpoints, pending_writes
from core.fsutil import filesystem_clones
from lightning_ckpt import AsyncCheckpointIO
from tests.helpers import GatedCommit, SlowCommit, assert_same, run_script, unwritable, wait_until
from tests.lightning_helpers import EvaluatedClassifier, TinyClassifier, tiny_data, trainer


def _fit(dirpath, plugins, save_last, max_epochs=3, ckpt_path=None, model=None, **checkpoint_kwargs):
    L.seed_everything(0)
    model = model or TinyClassifier()
    checkpoint = ModelCheckpoint(
        dirpath=dirpath,
        save_top_k=2,
        monitor="train_loss",
        every_n_train_steps=3,
        save_last=save_last,
        **checkpoint_kwargs,
    )
    t = trainer(max_epochs=max_epochs, plugins=plugins, callbacks=[checkpoint])
    t.fit(model, tiny_data(), ckpt_path=ckpt_path)
    return t, model, checkpoint


def _listing(directory):
    return sorted(
        (name, os.path.islink(directory / name) and os.readlink(directory / name)) for name in os.listdir(directory)
    )


@pytest.mark.parametrize("save_last", [True, "link"])
def test_files_match_the_default_plugin_and_hold_the_saving_step(tmp_path, save_last):
    _fit(tmp_path / "sync", [], save_last)
    _fit(tmp_path / "async", [AsyncCheckpointIO()], save_last)
    assert _listing(tmp_path / "async") == _listing(tmp_path / "sync")
    for name in os.listdir(tmp_path / "sync"):
        expected = torch.load(tmp_path / "sync" / name, weights_only=True)
        actual = torch.load(tmp_path / "async" / name, weights_only=True)
        # Same model and optimizer state as the synchronous save of that very step,
        # although training went on mutating them while the file was written.
        assert actual["global_step"] == expected["global_step"]
        assert_same(actual["state_dict"], expected["state_dict"])
        assert_same(actual["optimizer_states"], expected["optimizer_states"])
        loaded = TinyClassifier.load_from_checkpoint(tmp_path / "async" / name)
        assert_same(loaded.state_dict(), expected["state_dict"])


def test_resume_matches_a_synchronous_resume_and_plugin_rearms(tmp_path):
    _fit(tmp_path / "sync", [], True, max_epochs=2)
    plugin = AsyncCheckpointIO()
    _fit(tmp_path / "async", [plugin], True, max_epochs=2)
    assert plugin.writer_pid is None, "teardown did not drain and release the writer"

    sync_trainer, sync_model, _ = _fit(tmp_path / "sync", [], True, max_epochs=4, ckpt_path="last")
    async_trainer, async_model, _ = _fit(tmp_path / "async", [plugin], True, max_epochs=4, ckpt_path="last")
    assert async_trainer.global_step == sync_trainer.global_step
    assert async_trainer.current_epoch == sync_trainer.current_epoch
    assert_same(async_model.state_dict(), sync_model.state_dict())
    assert_same(async_trainer.optimizers[0].state_dict()["state"], sync_trainer.optimizers[0].state_dict()["state"])
    assert _listing(tmp_path / "async") == _listing(tmp_path / "sync")


class _CheckEarlierCheckpointsAreDurable(Callback):
    def __init__(self, dirpath):
        self.dirpath = dirpath
        self.checked = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.saw_drain_first = type(trainer.callbacks[0]).__name__ == "_AsyncCheckpointCallback"
        if trainer.current_epoch == 0:
            return
        steps_per_epoch = trainer.num_training_batches
        previous_end = trainer.current_epoch * steps_per_epoch
        for step in range(3, previous_end, 3):
            files = [f for f in os.listdir(self.dirpath) if f.endswith(f"step={step}.ckpt")]
            assert files, f"checkpoint of step {step} not durable at epoch {trainer.current_epoch} start"
            torch.load(os.path.join(self.dirpath, files[0]), weights_only=True)
            self.checked += 1
        # The one ModelCheckpoint saved in the previous epoch's own end hook, just before this hook.
        end_of_previous = self.dirpath / "ends" / f"end-epoch={trainer.current_epoch - 1}.ckpt"
        assert end_of_previous.exists(), f"{end_of_previous.name} not durable at the next epoch's start"
        torch.load(end_of_previous, weights_only=True)
        self.checked += 1


@pytest.mark.slow
def test_every_checkpoint_of_an_epoch_is_durable_when_the_next_epoch_starts(tmp_path):
    checker = _CheckEarlierCheckpointsAreDurable(tmp_path)
    by_step = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=3)
    at_epoch_end = ModelCheckpoint(dirpath=tmp_path / "ends", save_top_k=-1, filename="end-{epoch}")
    # Slow commits: without the drain at the epoch's start, the next epoch would start before they land.
    plugin = AsyncCheckpointIO(max_in_flight=3, commit_hook=SlowCommit(0.5))
    t = trainer(max_epochs=3, plugins=[plugin], callbacks=[checker, by_step, at_epoch_end])
    t.fit(TinyClassifier(), tiny_data())
    assert checker.checked > 0
    assert checker.saw_drain_first, "the drain callback was not attached first"


def test_a_path_through_a_missing_folder_saves_as_lightning_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plugin = AsyncCheckpointIO()
    t, model, _ = _fit(tmp_path / "fit", [plugin], False, max_epochs=1)
    t.save_checkpoint("sub/../b.ckpt")  # `sub/` does not exist: Lightning's own saver creates it
    assert (tmp_path / "sub").is_dir() and torch.load(tmp_path / "b.ckpt", weights_only=True)["global_step"] > 0


def test_checkpoint_costs_reach_the_lightning_logger(tmp_path):
    plugin = AsyncCheckpointIO()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=3)
    csv = CSVLogger(tmp_path / "logs", name="", version="")
    t = trainer(max_epochs=2, plugins=[plugin], callbacks=[checkpoint], logger=csv)
    t.fit(TinyClassifier(), tiny_data())
    saved = len([name for name in os.listdir(tmp_path) if name.endswith(".ckpt")])
    assert plugin.stats.saves == saved > 1
    assert plugin.stats.last.persist_seconds >= plugin.stats.last.blocking_seconds > 0
    with open(csv.experiment.metrics_file_path) as f:
        rows = [row for row in csv_module.DictReader(f) if row["checkpoint/size_mb"]]
    # a row at the batch end after one or more commits (the epoch's drain makes one before the second epoch)
    assert 1 <= len(rows) <= saved
    assert [int(row["step"]) for row in rows] == sorted({int(row["step"]) for row in rows})
    for name in ("checkpoint/blocking_s", "checkpoint/persist_s", "checkpoint/size_mb", "checkpoint/write_gbps"):
        assert all(float(row[name]) > 0 for row in rows), name
    # Lightning's global_step reached the file's metadata, which `python -m core ls` shows
    from core.checkpoint_file import CheckpointFile

    assert CheckpointFile(str(tmp_path / "epoch=1-step=15.ckpt")).manifest["metadata"] == {"step": 15}


def _fabric(plugin):
    """Fabric: saves from the user's own loop, which the plugin makes asynchronous."""
    from lightning.fabric import Fabric

    return Fabric(accelerator="cpu", devices=1, plugins=[plugin])


def test_load_and_remove_wait_for_the_pending_write(tmp_path):
    plugin = AsyncCheckpointIO()
    fabric = _fabric(plugin)
    try:
        big = {"state_dict": {"w": torch.randn(16 << 20)}, "epoch": 1}
        path = tmp_path / "a.ckpt"
        fabric.save(path, big)
        loaded = plugin.load_checkpoint(path)
        assert torch.equal(loaded["state_dict"]["w"], big["state_dict"]["w"])

        fabric.save(tmp_path / "b.ckpt", big)
        plugin.remove_checkpoint(tmp_path / "b.ckpt")
        plugin.wait()
        assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]
        plugin.remove_checkpoint(tmp_path / "never-written.ckpt")  # quiet
    finally:
        plugin.teardown()


def test_failing_write_fails_the_fit_with_the_writers_message(tmp_path):
    dirpath = tmp_path / "ckpts"
    dirpath.mkdir()
    with unwritable(dirpath), pytest.raises(CheckpointWriteError) as info:
        _fit(dirpath, [AsyncCheckpointIO()], True)
    assert "ckpts" in str(info.value) and "Writer traceback" in str(info.value)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="max_in_flight"):
        AsyncCheckpointIO(max_in_flight=0)
    with pytest.raises(TypeError, match="checksums"):
        AsyncCheckpointIO(checksums="yes")
    with pytest.raises(ValueError, match="io_threads"):
        AsyncCheckpointIO(io_threads=-1)
    with pytest.raises(TypeError, match="pin_memory"):
        AsyncCheckpointIO(pin_memory="yes")
    plugin = AsyncCheckpointIO()
    with pytest.raises(TypeError, match="storage_options"):
        plugin.save_checkpoint({"a": 1}, tmp_path / "x.ckpt", storage_options={"compress": True})
    with pytest.raises(ValueError, match="remote"):
        plugin.save_checkpoint({"a": 1}, "s3://bucket/x.ckpt")
    plugin.teardown()


@pytest.mark.slow
def test_ddp_two_processes_rank_zero_writes_and_all_ranks_resume(tmp_path):
    result = run_script("lightning_ddp_script.py", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saves = {rank: int((tmp_path / f"saves_rank{rank}.txt").read_text()) for rank in (0, 1)}
    assert saves[0] > 0 and saves[1] == 0, saves
    resumed = [torch.load(tmp_path / f"resumed_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert resumed[0]["global_step"] == resumed[1]["global_step"] > 0
    assert_same(resumed[0]["state_dict"], resumed[1]["state_dict"])

    # After fit, trainer.save_checkpoint is durable before Lightning's barrier: both ranks test from it.
    tested = [torch.load(tmp_path / f"tested_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert tested[0]["global_step"] == tested[1]["global_step"] > resumed[0]["global_step"]


def test_a_save_after_fit_is_durable_when_it_returns_and_leaves_no_writer(tmp_path):
    plugin = AsyncCheckpointIO()
    t, model, _ = _fit(tmp_path / "fit", [plugin], True, max_epochs=1)
    path = tmp_path / "after_fit.ckpt"
    t.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["global_step"] == t.global_step  # no wait needed
    assert_same(TinyClassifier.load_from_checkpoint(path).state_dict(), model.state_dict())
    assert plugin.writer_pid is None, "a writer process was started for a save outside fit"
    t.validate(EvaluatedClassifier(), tiny_data(), ckpt_path="./" + os.path.relpath(path))  # any spelling


def test_a_pending_save_is_waited_for_by_every_plugin_under_any_spelling_of_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    gate = tmp_path / "gate"
    writer = AsyncCheckpointIO(commit_hook=GatedCommit(tmp_path / "reached", gate))
    fabric = _fabric(writer)
    reader = AsyncCheckpointIO()  # another plugin (another Trainer's) of the same process
    try:
        spellings = ("./model_b.ckpt", str(tmp_path / "model_b.ckpt"), "sub/../model_b.ckpt", "model_b.ckpt")
        for step, spelling in enumerate(spellings):
            # Asynchronous (Fabric); its commit is held until the gate opens.
            fabric.save("model_b.ckpt", {"state_dict": {"w": torch.full((8,), float(step))}, "global_step": step})
            timer = threading.Timer(0.2, gate.touch)
            timer.start()
            loaded = reader.load_checkpoint(spelling)  # waits for this save, not an older file
            timer.join()
            gate.unlink()
            assert loaded["global_step"] == step and torch.all(loaded["state_dict"]["w"] == step)
        fabric.save("model_b.ckpt", {"global_step": 9})
        threading.Timer(0.2, gate.touch).start()
        reader.remove_checkpoint("sub/../model_b.ckpt")  # removal waits for the pending write too
        writer.wait()
        assert not (tmp_path / "model_b.ckpt").exists()
    finally:
        gate.touch()
        writer.teardown()
        reader.teardown()


def test_a_missing_checkpoint_is_lightnings_error(tmp_path):
    plugin = AsyncCheckpointIO()
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        plugin.load_checkpoint(tmp_path / "missing.ckpt")


class _SavesFromBatchEnd(Callback):
    """A user callback whose batch-end hook makes the plugin's first save of the fit."""

    def __init__(self, dirpath):
        self.dirpath = dirpath
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch_idx))
        if batch_idx == 1:
            trainer.save_checkpoint(os.path.join(self.dirpath, f"manual-{trainer.current_epoch}.ckpt"))


def test_attaching_the_drain_callback_during_a_hook_runs_no_hook_twice(tmp_path):
    saver = _SavesFromBatchEnd(tmp_path)
    t = trainer(
        max_epochs=2,
        plugins=[AsyncCheckpointIO()],
        callbacks=[saver],
        enable_checkpointing=False,
        default_root_dir=tmp_path / "root",
    )
    t.fit(TinyClassifier(), tiny_data())
    assert len(saver.batches) == len(set(saver.batches)) == 2 * t.num_training_batches
    assert sorted(os.listdir(tmp_path)) == ["manual-0.ckpt", "manual-1.ckpt"]


def test_a_direct_call_without_a_trainer_is_durable_when_it_returns(tmp_path):
    plugin = AsyncCheckpointIO()
    plugin.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}}, tmp_path / "direct.ckpt")
    assert torch.equal(torch.load(tmp_path / "direct.ckpt", weights_only=True)["state_dict"]["w"], torch.arange(4.0))
    assert plugin.writer_pid is None  # no writer process was started


def test_the_drain_callback_leaves_the_trainer_after_fit(tmp_path):
    t, _, _ = _fit(tmp_path, [AsyncCheckpointIO()], True, max_epochs=1)
    assert not any(type(c).__name__ == "_AsyncCheckpointCallback" for c in t.callbacks)


def _fit_saving_top_k_and_last(directory, plugin: AsyncCheckpointIO):
    checkpoint = ModelCheckpoint(dirpath=directory, save_top_k=-1, save_last=True, every_n_train_steps=4)
    trainer(max_epochs=2, plugins=[plugin], callbacks=[checkpoint]).fit(TinyClassifier(), tiny_data())
    stats = plugin.stats
    # At least a top-k file for each of the 4 steps and the final last.ckpt (earlier ones may be skipped)
    assert stats is not None and stats.last is not None and stats.saves >= 5
    return stats


def test_top_k_and_last_of_one_step_are_one_file_on_disk(tmp_path):
    stats = _fit_saving_top_k_and_last(tmp_path, AsyncCheckpointIO())
    # Each step is copied and written once, except the first: its last.ckpt records ModelCheckpoint's
    # new last_model_path, another state. Stats count committed saves only, and a last.ckpt the
    # writer had not started when the next one came is skipped: that step's copy is then not counted.
    steps = len([name for name in os.listdir(tmp_path) if name != "last.ckpt"])
    assert stats.written_nbytes == stats.copied_nbytes < stats.nbytes
    assert stats.copied_nbytes in (steps * stats.last.nbytes, (steps + 1) * stats.last.nbytes)
    step = torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"]
    (top,) = [name for name in os.listdir(tmp_path) if name.endswith(f"step={step}.ckpt")]
    if not filesystem_clones(str(tmp_path)):  # a hard link; where extents are shared, two files
        assert os.path.samefile(tmp_path / top, tmp_path / "last.ckpt")
    os.unlink(tmp_path / top)
    assert TinyClassifier.load_from_checkpoint(tmp_path / "last.ckpt") is not None


def test_every_save_is_written_on_its_own_when_sharing_is_off(tmp_path):
    stats = _fit_saving_top_k_and_last(tmp_path, AsyncCheckpointIO(share_repeated_saves=False))
    assert stats.written_nbytes == stats.copied_nbytes == stats.nbytes
    assert len({os.stat(tmp_path / name).st_ino for name in os.listdir(tmp_path)}) == len(os.listdir(tmp_path))


class _StagingMemoryProbe(Callback):
    """Notes the plugin's staging slabs when training starts (the checkpoint is restored by then),
    and checks that the first save after that used them instead of allocating its own."""

    def __init__(self, plugin: AsyncCheckpointIO) -> None:
        self.plugin = plugin
        self.ready: set[str] | None = None
        self.after_first_save: set[str] | None = None

    def on_train_start(self, trainer, pl_module):
        pool = self.plugin.checkpointer.stager.pool
        wait_until(lambda: len(pool.slabs) == 1, timeout=30, what="staging memory readied while loading the checkpoint")
        self.ready = set(pool.slabs)

    def on_train_batch_end(self, trainer, pl_module, *args):
        stats = self.plugin.stats
        if self.after_first_save is None and stats is not None and stats.saves >= 1:
            self.after_first_save = set(self.plugin.checkpointer.stager.pool.slabs)


def test_resuming_a_fit_readies_the_staging_memory_of_its_first_save(tmp_path):
    _fit(tmp_path, [AsyncCheckpointIO()], True, max_epochs=1)
    plugin = AsyncCheckpointIO(max_in_flight=1, in_flight_bytes=0)  # one slab: the first save finds it or replaces it
    probe = _StagingMemoryProbe(plugin)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    t = trainer(max_epochs=2, plugins=[plugin], callbacks=[probe, checkpoint])
    t.fit(TinyClassifier(), tiny_data(), ckpt_path=tmp_path / "last.ckpt")
    assert probe.ready and probe.after_first_save == probe.ready, "the first save allocated its staging memory"


@pytest.mark.slow
def test_fabric_ddp_every_rank_loads_what_was_just_saved(tmp_path):
    result = run_script("fabric_ddp_script.py", tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"loaded_rank{rank}.pt") == [0, 1, 2], rank


@pytest.mark.slow
def test_model_parallel_saves_sharded_asynchronously_and_resumes_on_any_number_of_devices(tmp_path):
    saved = run_script("lightning_model_parallel_script.py", tmp_path, "save", 2)
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    assert (tmp_path / "while_held.txt").read_text() == "False", "training waited for the checkpoint's commit"
    checkpoints = list_checkpoints(tmp_path / "ckpts")
    assert [c.name for c in checkpoints if c.complete] == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    last = tmp_path / "ckpts" / "last.ckpt"
    assert {"commit.json", ".metadata", "meta.pt"} <= set(os.listdir(last))
    assert len([name for name in os.listdir(last) if name.endswith(".distcp")]) == 2  # one file per rank
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    for phase, devices in (("resume", 1), ("resume", 3), ("stock_resume", 2)):
        resumed = run_script("lightning_model_parallel_script.py", tmp_path, phase, devices)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert_same(torch.load(tmp_path / "resumed.pt", weights_only=True), reference)


class _OpenGateAtStep3(Callback):
    """Notes whether step 1's checkpoint is still being written when step 3 ends, then opens the gate."""

    def __init__(self, directory, gate) -> None:
        self.directory, self.gate, self.pending_at_step_3 = directory, gate, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            self.pending_at_step_3 = bool(pending_writes(os.path.join(self.directory, "epoch=0-step=1.ckpt")))
            self.gate.touch()


def test_saving_every_step_with_top_1_neither_waits_for_removed_files_nor_lets_them_reappear(tmp_path):
    """ModelCheckpoint(every_n_train_steps=1) removes the previous step's file right after saving the
    next; the plugin does not wait for that file's write, and leaves what Lightning leaves."""

    def fit(directory, plugins, callbacks=()):
        L.seed_everything(0)
        model = TinyClassifier()
        checkpoint = ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_last=True)
        trainer(max_epochs=2, plugins=plugins, callbacks=[checkpoint, *callbacks]).fit(model, tiny_data())
        return model

    fit(tmp_path / "sync", [])
    gate = tmp_path / "gate"
    opener = _OpenGateAtStep3(tmp_path / "async", gate)
    plugin = AsyncCheckpointIO(commit_hook=GatedCommit(tmp_path / "reached", gate), max_in_flight=4)
    model = fit(tmp_path / "async", [plugin], [opener])
    assert opener.pending_at_step_3, "training waited for the write of a checkpoint it had removed"
    assert _listing(tmp_path / "async") == _listing(tmp_path / "sync")
    for name in os.listdir(tmp_path / "async"):
        assert torch.load(tmp_path / "async" / name, weights_only=True)["global_step"] == 16
    assert_same(TinyClassifier.load_from_checkpoint(tmp_path / "async" / "last.ckpt").state_dict(), model.state_dict())


def test_a_removal_outside_a_fit_frees_the_file_before_it_returns(tmp_path, monkeypatch):
    """ddp_spawn's main process removes its hand-over file after the fit: no thread is left to free it."""
    from lightning_ckpt import removals as removals_module

    handed_to_a_thread = []
    monkeypatch.setattr(removals_module, "remove_file", handed_to_a_thread.append)
    path = tmp_path / "hand_over.ckpt"
    path.write_bytes(os.urandom(1 << 20))
    AsyncCheckpointIO().remove_checkpoint(path)
    assert not path.exists() and handed_to_a_thread == []
