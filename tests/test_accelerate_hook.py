"""The Accelerate adapter with a real Accelerator on CPU."""

import copy
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType

from accelerate_ckpt import ENV_FLAG, async_checkpointing_enabled, enable_async_checkpointing
from accelerate_ckpt.save_state import PENDING_DIR, unsupported_reason
from core import CheckpointWriteError
from tests.accelerate_helpers import Counter, next_draws, setup, snapshot, train
from tests.helpers import (
    REPO,
    SCRIPTS,
    FailingCommit,
    GatedCommit,
    SlowCommit,
    assert_same,
    ctrl_c_at,
    finish_scenario,
    free_port,
    script_env,
    start_scenario,
    unwritable,
)


def test_flag_parsing(monkeypatch):
    monkeypatch.delenv(ENV_FLAG, raising=False)
    assert async_checkpointing_enabled() is True
    for value in ("1", "true", "YES", " on "):
        monkeypatch.setenv(ENV_FLAG, value)
        assert async_checkpointing_enabled() is True
    for value in ("0", "false", "No", "off"):
        monkeypatch.setenv(ENV_FLAG, value)
        assert async_checkpointing_enabled() is False
    monkeypatch.setenv(ENV_FLAG, "")  # empty means unset, as elsewhere
    assert async_checkpointing_enabled() is True
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
    assert os.listdir(tmp_path / "async") == [PENDING_DIR], "checkpoint files were visible before they were complete"
    train(accelerator, models, optimizers, schedulers, counter)  # mutate everything while it writes
    handle.wait()
    assert sorted(os.listdir(tmp_path / "async")) == sorted(os.listdir(tmp_path / "own"))
    names = sorted(os.listdir(tmp_path / "async"))
    assert ("model.safetensors" in names and "model_1.safetensors" in names) == safe_serialization
    assert ("pytorch_model.bin" in names and "pytorch_model_1.bin" in names) != safe_serialization
    assert {
        "optimizer.bin",
        "optimizer_1.bin",
        "scheduler.bin",
        "scheduler_1.bin",
        "random_states_0.pkl",
        "custom_checkpoint_0.pkl",
    } <= set(names)
    assert PENDING_DIR not in os.listdir(tmp_path)

    accelerator.load_state(tmp_path / "async")  # stock load_state reads the async files
    assert_same(snapshot(models, optimizers, schedulers, counter), expected)
    _assert_same_draws(next_draws(), own_draws)
    handle.close()
    assert "save_state" not in vars(accelerator)


def test_with_total_limit_a_writer_that_fell_behind_skips_what_pruning_would_delete(tmp_path, caplog):
    """Saves older than the newest total_limit that the writer has not reached are never
    written (total_limit would delete them once the newer ones are): the writer goes on to the
    newest, the newest are restored, nothing is left of the skipped ones, and the log says so once."""
    from tests.helpers import wait_until

    accelerator, models, optimizers, schedulers, counter = setup(
        project_dir=str(tmp_path / "project"), automatic_checkpoint_naming=True, total_limit=2
    )
    gate = GatedCommit(tmp_path / "reached", tmp_path / "gate", log=tmp_path / "written")
    handle = enable_async_checkpointing(accelerator, commit_hook=gate)
    try:
        for i in range(6):
            train(accelerator, models, optimizers, schedulers, counter, steps=1)
            accelerator.save_state()
            if i == 0:
                wait_until(lambda: (tmp_path / "reached").exists(), what="the writer held in the first save")
        expected = copy.deepcopy(snapshot(models, optimizers, schedulers, counter))
        expected_draws = next_draws()
    finally:
        (tmp_path / "gate").touch()
    handle.wait()

    checkpoints = tmp_path / "project" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_4", "checkpoint_5"]
    behind = [r.getMessage() for r in caplog.records if "fell behind" in r.getMessage()]
    assert len(behind) == 1 and "total_limit=2" in behind[0], behind
    written = (tmp_path / "written").read_text().split()
    written_in = {i: sum(f"{os.sep}checkpoint_{i}{os.sep}" in p for p in written) for i in range(6)}
    files_per_save = len(os.listdir(checkpoints / "checkpoint_5"))
    # The save the writer was on finished. (That the skipped ones wrote nothing depends on their
    # cancels reaching the writer before the gate opens: test_cancel_all_but_newest_... waits for that.)
    assert written_in[0] == written_in[4] == written_in[5] == files_per_save, written_in
    train(accelerator, models, optimizers, schedulers, counter)
    accelerator.load_state()  # the newest: checkpoint_5
    assert_same(snapshot(models, optimizers, schedulers, counter), expected)
    _assert_same_draws(next_draws(), expected_draws)
    handle.close()


def test_cancel_all_but_newest_skips_the_saves_the_writer_has_not_reached(tmp_path):
    """FileSetCheckpointer.cancel_all_but_newest: a cancelled save writes nothing, resolves as
    cancelled and leaves no folder; the save the writer is on and the newest ones complete."""
    from accelerate_ckpt.file_set import FileSetCheckpointer
    from core import AsyncOptions

    saver = FileSetCheckpointer(
        AsyncOptions().config(), GatedCommit(tmp_path / "reached", tmp_path / "gate", tmp_path / "log")
    )
    try:
        futures = _held_burst_of_saves(saver, tmp_path, 5, numel=4)
        asked = saver.cancel_all_but_newest(2)
        # ckpt_0 too: the writer has begun it, so it is written whole all the same
        assert [final for final, _ in asked] == [str(tmp_path / f"ckpt_{i}") for i in range(3)]
        for _, received in asked:
            received.result(timeout=60)  # the writer has the request before it goes on
        assert saver.cancel_all_but_newest(2) == []  # each save is asked once
    finally:
        (tmp_path / "gate").touch()

    assert [f.result(timeout=120).cancelled for f in futures] == [False, True, True, False, False]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0", "ckpt_3", "ckpt_4", "gate", "log", "reached"]
    for i in (0, 3, 4):
        assert sorted(os.listdir(tmp_path / f"ckpt_{i}")) == ["model.bin", "step.bin"]
        assert torch.equal(torch.load(tmp_path / f"ckpt_{i}" / "model.bin")["w"], torch.full((4,), float(i)))
    written = (tmp_path / "log").read_text().split()
    assert len(written) == 6 and not [p for p in written if "ckpt_1" in p or "ckpt_2" in p], written
    assert saver.cancel_all_but_newest(0) == []  # nothing is pending
    saver.close()


def test_wait_gives_back_the_staging_memory_lent_for_a_burst(tmp_path):
    """Saves made while the writer is held stage into slabs lent beyond max_in_flight; once
    wait() returns, every save is published and those slabs are closed, not kept for a linger."""
    from accelerate_ckpt.file_set import FileSetCheckpointer
    from core import AsyncOptions

    saver = FileSetCheckpointer(
        AsyncOptions(max_in_flight=1).config(), GatedCommit(tmp_path / "reached", tmp_path / "gate")
    )
    try:
        futures = _held_burst_of_saves(saver, tmp_path, 4)
        pool = saver._checkpointer.stager.pool  # (no public view of the staging memory of a file set)
        assert len(pool.slabs) > 2, "the burst was not staged in lent slabs: nothing to give back"
        (tmp_path / "gate").touch()
        saver.wait()
        assert all(not f.result().cancelled for f in futures)
        assert len(pool.slabs) <= 2, f"{len(pool.slabs)} slabs kept after wait(), max_in_flight=1 x 2 files"
        for i in range(4):
            assert torch.equal(torch.load(tmp_path / f"ckpt_{i}" / "model.bin")["w"], torch.full((1024,), float(i)))
    finally:
        (tmp_path / "gate").touch()
        saver.close()


def _held_burst_of_saves(saver, tmp_path, count, numel=1024):
    """`count` saves of two files each into tmp_path/ckpt_<i> (model.bin: `numel` values i;
    step.bin: i), the writer held in the first."""
    from accelerate_ckpt.file_set import NamedState
    from tests.helpers import wait_until

    futures = []
    for i in range(count):
        final = tmp_path / f"ckpt_{i}"
        final.mkdir()
        files = [NamedState("model.bin", {"w": torch.full((numel,), float(i))}), NamedState("step.bin", {"step": i})]
        staging = str(final / ".staging")
        futures.append(saver.save(str(final), lambda _, files=files: files, staging=staging, publishes=True))
        if i == 0:
            wait_until(lambda: (tmp_path / "reached").exists(), what="the writer held in the first save")
    return futures


@pytest.mark.slow
def test_a_save_one_rank_cancelled_is_cancelled_on_every_rank(tmp_path):
    """Two real ranks: rank 0 cancels two saves whose files rank 1 has written; the commit vote
    makes both ranks drop them (nothing of either rank is left) and publish the others."""
    from tests.helpers import launch_ranks

    codes = launch_ranks(2, [os.path.join(SCRIPTS, "file_set_ranks.py"), str(tmp_path)], timeout=300)
    assert codes == [0, 0], codes


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
        assert path.name == f"checkpoint_{i}" and path.is_dir()  # there at once, as Accelerate makes it
        # Every listed folder is complete, or its files are still being written (and are not visible).
        for folder in os.listdir(tmp_path / "checkpoints"):
            try:
                files = os.listdir(tmp_path / "checkpoints" / folder)
            except FileNotFoundError:
                continue  # pruned since the listing: it leaves in one rename, never half-deleted
            complete = "random_states_0.pkl" in files and "optimizer.bin" in files
            # (empty: a save the writer skipped, being removed, as Accelerate's folder before its files)
            assert complete or files in ([PENDING_DIR], []), (folder, files)
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
        with unwritable(target), pytest.raises(PermissionError, match="out"):
            accelerator.save_state(target / "ckpt")
        assert not (target / "ckpt").exists()
        accelerator.save_state(target / "ckpt")  # works again once the directory is writable
        handle.wait()
        assert "optimizer.bin" in os.listdir(target / "ckpt")
    finally:
        handle.close()


def test_background_write_failure_surfaces_and_publishes_nothing(tmp_path):
    accelerator, *_ = setup()
    handle = enable_async_checkpointing(accelerator, commit_hook=FailingCommit())
    try:
        accelerator.save_state(tmp_path / "ckpt")
        with pytest.raises(CheckpointWriteError, match="injected failure before commit"):
            accelerator.load_state(tmp_path / "ckpt")
        assert os.listdir(tmp_path / "ckpt") == [], "a failed checkpoint left files (or its pending folder) behind"
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


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tmp_path):
    """`accelerate launch --multi_gpu` starts torchrun; with cpu=True the ranks use gloo on CPU."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            os.path.join(SCRIPTS, "accelerate_launch_script.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=script_env(ACCELERATE_ASYNC_CHECKPOINT="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert "random_states_0.pkl" in names and "random_states_1.pkl" in names
    for rank in (0, 1):
        assert (tmp_path / f"rng_ok_{rank}").exists()


# -- a user's other files, and what stock Accelerate does


def _state_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith((".bin", ".pkl", ".safetensors")))


def test_saving_into_an_existing_folder_keeps_everything_else(tmp_path):
    accelerator, models, optimizers, schedulers, counter = setup()
    handle = enable_async_checkpointing(accelerator)
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "events.txt").write_text("step 1")
    (out / "config.json").write_text("{}")
    (out / "optimizer.bin").write_text("an older checkpoint's file, replaced by this save")
    accelerator.save_state(out)
    handle.wait()
    assert (out / "logs" / "events.txt").read_text() == "step 1" and (out / "config.json").read_text() == "{}"
    assert {"config.json", "logs", "model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(os.listdir(out))
    assert PENDING_DIR not in os.listdir(out)
    train(accelerator, models, optimizers, schedulers, counter)
    expected = copy.deepcopy(snapshot(models, optimizers, schedulers, counter))
    accelerator.save_state(out)  # a second checkpoint into the same folder replaces only its own files
    train(accelerator, models, optimizers, schedulers, counter)
    accelerator.load_state(out)
    assert_same(snapshot(models, optimizers, schedulers, counter), expected)
    assert (out / "logs" / "events.txt").exists() and (out / "config.json").exists()
    handle.close()


def test_saving_into_the_working_directory_keeps_the_training_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('training')")
    accelerator, *_ = setup()
    handle = enable_async_checkpointing(accelerator)
    returned = accelerator.save_state(".")
    handle.wait()
    assert returned == Path(".")  # what Accelerate returns: the folder as given
    assert (tmp_path / "train.py").read_text() == "print('training')"
    assert {"train.py", "model.safetensors", "optimizer.bin"} <= set(os.listdir(tmp_path))
    assert PENDING_DIR not in os.listdir(tmp_path)
    handle.close()


def test_automatic_naming_leaves_the_project_folder_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "checkpoints").mkdir()
    accelerator, *_ = setup(project_dir=str(tmp_path), automatic_checkpoint_naming=True)
    handle = enable_async_checkpointing(accelerator)
    assert accelerator.save_state() == Path(tmp_path / "checkpoints" / "checkpoint_0")
    handle.wait()
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "notes.txt"]
    handle.close()


def test_save_state_without_a_folder_raises_what_accelerate_raises(tmp_path):
    accelerator, *_ = setup()
    with pytest.raises(TypeError):
        accelerator.save_state()  # stock Accelerate: os.makedirs(None)
    handle = enable_async_checkpointing(accelerator)
    with pytest.raises(TypeError, match="output_dir"):
        accelerator.save_state()
    handle.close()


def test_another_accelerator_in_the_process_waits_for_a_pending_save(tmp_path):
    accelerator, models, optimizers, schedulers, counter = setup()
    gate = tmp_path / "gate"
    first = enable_async_checkpointing(accelerator, commit_hook=GatedCommit(tmp_path / "reached", gate))
    train(accelerator, models, optimizers, schedulers, counter)
    expected = copy.deepcopy(snapshot(models, optimizers, schedulers, counter))
    accelerator.save_state(tmp_path / "ckpt")

    other, other_models, other_optimizers, other_schedulers, other_counter = setup()
    second = enable_async_checkpointing(other)
    threading.Timer(0.5, gate.touch).start()  # the commit is held until then
    other.load_state(tmp_path / "ckpt")  # waits for the first accelerator's pending save
    assert_same(snapshot(other_models, other_optimizers, other_schedulers, other_counter), expected)
    first.close()
    second.close()


def test_automatic_naming_load_with_another_accelerator_finds_the_pending_save(tmp_path):
    accelerator, *_ = setup(project_dir=str(tmp_path), automatic_checkpoint_naming=True)
    first = enable_async_checkpointing(accelerator, commit_hook=SlowCommit(0.5))
    accelerator.save_state()
    other, *_ = setup(project_dir=str(tmp_path), automatic_checkpoint_naming=True)
    second = enable_async_checkpointing(other)
    other.load_state()  # lists checkpoints/ only after the pending save is published
    first.close()
    second.close()


def test_model_file_carries_the_metadata_accelerates_loaders_expect(tmp_path):
    from accelerate.utils import load_checkpoint_in_model
    from safetensors import safe_open

    accelerator, models, *_ = setup()
    handle = enable_async_checkpointing(accelerator)
    accelerator.save_state(tmp_path / "ckpt")
    handle.wait()
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    load_checkpoint_in_model(fresh, str(tmp_path / "ckpt" / "model.safetensors"))
    assert_same(fresh.state_dict(), accelerator.unwrap_model(models[0]).state_dict())
    handle.close()


def test_accelerator_stays_picklable_and_unpickles_with_its_own_methods(tmp_path):
    accelerator, *_ = setup()
    handle = enable_async_checkpointing(accelerator)
    copy_of = pickle.loads(pickle.dumps(accelerator))
    assert "save_state" not in vars(copy_of) and copy_of.save_state.__func__ is Accelerator.save_state
    assert isinstance(accelerator.__dict__["save_state"], object) and "save_state" in vars(accelerator)
    handle.close()


class _RunningLoss(Counter):
    """A registered object whose state holds a tensor still attached to the autograd graph."""

    def state_dict(self):
        weight = torch.ones(3, requires_grad=True)
        return {**super().state_dict(), "running_loss": (weight * 2).sum()}


def test_state_torch_save_accepts_is_accepted(tmp_path):
    accelerator, *_ = setup()
    accelerator.register_for_checkpointing(_RunningLoss())
    handle = enable_async_checkpointing(accelerator)
    accelerator.save_state(tmp_path / "ckpt")
    handle.wait()
    saved = torch.load(tmp_path / "ckpt" / "custom_checkpoint_1.pkl", weights_only=True)
    assert saved["running_loss"].item() == 6.0
    handle.close()


def test_save_model_into_a_folder_with_a_pending_checkpoint_keeps_the_newer_weights(tmp_path):
    accelerator, models, optimizers, schedulers, counter = setup()
    with enable_async_checkpointing(accelerator, commit_hook=SlowCommit(1.0)):
        accelerator.save_state(tmp_path / "out")
        train(accelerator, models, optimizers, schedulers, counter)
        newer = {k: v.clone() for k, v in models[0].state_dict().items()}
        accelerator.save_model(models[0], tmp_path / "out")  # waits for the checkpoint's files first
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(saved) == sorted(newer) and all(torch.equal(saved[k], newer[k]) for k in newer)


def test_deleting_the_folder_of_a_pending_save_cancels_it_quietly(tmp_path):
    import shutil

    accelerator, *_ = setup()
    with enable_async_checkpointing(accelerator, commit_hook=SlowCommit(0.5)) as handle:
        accelerator.save_state(tmp_path / "d")
        shutil.rmtree(tmp_path / "d")
        handle.wait()  # no error: the user deleted it
        assert not (tmp_path / "d").exists(), "the save brought the deleted folder back"
        assert handle.stats.saves == 0


@pytest.mark.slow
def test_a_save_killed_before_publishing_is_refused_by_load_state_and_skipped_by_its_search(tmp_path):
    from core import UncommittedCheckpointError

    trainer = start_scenario("accelerate_killed_before_publish", tmp_path, own_session=True)
    assert trainer.stdout.readline().startswith("pending"), trainer.stderr.read()
    from tests.helpers import kill_together, wait_until

    wait_until(lambda: (tmp_path / "reached").exists(), what="the held commit")
    kill_together(trainer)  # trainer and writer die together, before publishing
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0", "checkpoint_1"]
    accelerator, *_ = setup(project_dir=tmp_path, automatic_checkpoint_naming=True)
    with enable_async_checkpointing(accelerator):
        with pytest.raises(UncommittedCheckpointError, match="incomplete: the save that was writing it died"):
            accelerator.load_state(checkpoints / "checkpoint_1")
        accelerator.load_state()  # the newest complete one: checkpoint_0


@pytest.mark.slow
def test_a_save_killed_halfway_through_publishing_is_refused_until_saved_again(tmp_path):
    from core import UncommittedCheckpointError

    trainer = start_scenario("accelerate_killed_mid_publish", tmp_path)
    finish_scenario(trainer)
    assert trainer.returncode == -9
    accelerator, models, optimizers, schedulers, counter = setup()
    with enable_async_checkpointing(accelerator):
        with pytest.raises(UncommittedCheckpointError, match="mixes two saves"):
            accelerator.load_state(tmp_path / "ck")
        accelerator.save_state(tmp_path / "ck")  # a complete save replaces every file of the mix
        accelerator.load_state(tmp_path / "ck")
    assert PENDING_DIR not in os.listdir(tmp_path / "ck")


def test_a_ctrl_c_at_any_point_of_save_state_leaves_no_folder_behind_and_the_next_one_goes_on(tmp_path):
    """Ctrl-C at every 20th signal check of save_state (a real SIGINT, helpers.ctrl_c_at). A save
    interrupted before it was under way leaves nothing, not even its numbered folder (so the next
    save_state does not find it "already exists"); one under way completes and counts. total_limit
    then prunes to the newest complete checkpoints, and no staging folder is left."""
    accelerator, models, optimizers, schedulers, counter = setup(
        project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2
    )
    with enable_async_checkpointing(accelerator):
        accelerator.save_state()
        points, _ = ctrl_c_at(0, accelerator.save_state)
        interrupted = 0
        for point in range(1, points, 20):
            train(accelerator, models, optimizers, schedulers, counter, steps=1)
            interrupted += ctrl_c_at(point, accelerator.save_state)[1]
        assert interrupted > points // 40
        train(accelerator, models, optimizers, schedulers, counter, steps=1)
        expected = snapshot(models, optimizers, schedulers, counter)
        newest = accelerator.save_state()
        accelerator.load_state()
        assert_same(snapshot(models, optimizers, schedulers, counter), expected)
        left = sorted(os.listdir(tmp_path / "checkpoints"), key=lambda name: int(name.split("_")[1]))
        assert left[-1] == newest.name and len(left) == 2, [(f, os.listdir(tmp_path / "checkpoints" / f)) for f in left]
        for folder in left:
            assert sorted(os.listdir(tmp_path / "checkpoints" / folder)) == sorted(os.listdir(newest)), (
                f"{folder} is not a complete checkpoint"
            )
        accelerator.end_training()


def test_a_checkpoint_folder_being_deleted_under_its_pending_save_cancels_it_quietly(tmp_path):
    """rmtree of a checkpoint whose save is pending removes the staging folder's files before the
    folders: the publish then finds its files gone while the checkpoint folder is still there.
    That is the deletion, not a failed write (Accelerate's own test_checkpoint_deletion deletes its
    project folder so)."""
    from tests.helpers import wait_until

    accelerator, *_ = setup(project_dir=str(tmp_path / "project"), automatic_checkpoint_naming=True)
    handle = enable_async_checkpointing(accelerator, commit_hook=GatedCommit(tmp_path / "reached", tmp_path / "gate"))
    folder = accelerator.save_state()
    wait_until(lambda: (tmp_path / "reached").exists(), what="the held commit")
    staged = [p for p in (folder / PENDING_DIR).rglob("*") if p.is_file()]
    assert staged, "nothing was staged: the test tests nothing"
    for path in staged:  # as rmtree does first; the folders stay
        path.unlink()
    (tmp_path / "gate").touch()
    handle.wait()  # no error: the save was cancelled
    assert PENDING_DIR not in os.listdir(folder), "the cancelled save's staging folder was left"
    handle.close()
