"""Data safety: retention deletes only its own checkpoints, loads never mix saves, damaged and
hostile files are clear errors everywhere, a full disk is an error and never a crash."""

import json
import os
import threading

import pytest
import torch

from core import (
    CheckpointerConfig,
    CheckpointError,
    CheckpointProcess,
    CheckpointReader,
    CheckpointStagerConfig,
    CheckpointWriter,
    CheckpointWriterConfig,
    CorruptCheckpointError,
    DefaultStager,
    MissingKeysError,
    RetentionConfig,
    SyncCheckpointer,
    WriterStartError,
    find_latest,
    list_checkpoints,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from core.background_free import remove_file, wait_until_freed
from tests import hostile
from tests.helpers import flip_byte, run_cli, run_script, small_tmpfs


def _retaining(**retention):
    return CheckpointerConfig(writer_config=CheckpointWriterConfig(retention=RetentionConfig(**retention)))


def _state(step):
    return {"w": torch.full((256,), float(step)), "step": step}


def _printed(result):
    """(exit code, everything printed) of a CLI run."""
    return result.returncode, result.stdout + result.stderr


# ---------------------------------------------------------------- 1. retention owns only its series


def test_retention_never_deletes_files_it_did_not_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.ones(3)}, "pretrained_embeddings.pt")
    torch.save({"mean": torch.zeros(3)}, "dataset_stats.pt")
    torch.save({"w": torch.ones(3)}, "best.ckpt")
    with make_sync_checkpointer() as plain:
        plain.save("imported_step_5", _state(5))  # a checkpoint of ours, saved without retention
    (tmp_path / "latest").write_text("a file of the user's named latest")
    with make_sync_checkpointer(_retaining(keep_last=2)) as ckpt:
        for step in range(6):
            ckpt.save(f"step_{step}", _state(step), step=step)  # relative paths, in the project folder
    kept = sorted(os.listdir(tmp_path))
    assert kept == [
        "best.ckpt",
        "dataset_stats.pt",
        "imported_step_5",
        "latest",
        "pretrained_embeddings.pt",
        "step_4",
        "step_5",
    ], kept
    assert (tmp_path / "latest").read_text() == "a file of the user's named latest"


def test_two_runs_sharing_a_folder_each_keep_their_own(tmp_path):
    with (
        make_async_checkpointer(_retaining(keep_last=2, series="run1")) as run1,
        make_async_checkpointer(_retaining(keep_last=2, update_latest=False)) as run2,
    ):
        for step in range(5):
            run1.save(tmp_path / f"run1_{step}", _state(step), step=step)[1].result()
            run2.save(tmp_path / f"other_step_{step}", _state(step), step=step)[1].result()
    assert sorted(os.listdir(tmp_path)) == ["latest", "other_step_3", "other_step_4", "run1_3", "run1_4"]


def test_a_restarted_run_keeps_pruning_its_own_series(tmp_path):
    for first in (0, 3):  # the second checkpointer is the run after a restart
        with make_sync_checkpointer(_retaining(keep_last=2)) as ckpt:
            for step in range(first, first + 3):
                ckpt.save(tmp_path / f"step_{step:04d}", _state(step), step=step)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0004", "step_0005"]
    assert {info.series for info in list_checkpoints(tmp_path)} == {"step_#"}


# ---------------------------------------------------------------- 2. a damaged neighbour


def test_a_damaged_old_checkpoint_breaks_neither_resume_nor_later_saves(tmp_path):
    with make_async_checkpointer(_retaining(keep_last=3)) as ckpt:
        for step in range(3):
            ckpt.save(tmp_path / f"step_{step}", _state(step), step=step)[1].result()
        record = tmp_path / "step_0" / "commit.json"
        record.write_bytes(record.read_bytes().replace(b'"format"', b'"\xffformat"', 1))  # invalid UTF-8
        name_at = (tmp_path / "step_1" / "checkpoint_0.pt").read_bytes().rfind(b"checkpoint_0/data.pkl")
        hostile.flip(tmp_path / "step_1" / "checkpoint_0.pt", name_at + 3)  # a zip member name
        assert find_latest(tmp_path) == str(tmp_path / "step_2")
        for step in range(3, 7):  # every later save commits; retention goes on (the damaged ones are not its)
            result = ckpt.save(tmp_path / f"step_{step}", _state(step), step=step)[1].result()
            assert result.path == str(tmp_path / f"step_{step}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0", "step_1", "step_4", "step_5", "step_6"]
    for command in (["ls", tmp_path], ["verify", tmp_path / "step_0"], ["inspect", tmp_path / "step_1"]):
        code, said = _printed(run_cli(*command))
        assert code in (0, 1) and "Traceback" not in said, (command, said)
    assert _printed(run_cli("verify", tmp_path / "step_1"))[0] == 1


def test_maintenance_after_a_commit_never_fails_that_save(tmp_path, monkeypatch):
    import core.retention

    def broken(*args, **kwargs):
        raise RuntimeError("retention broke")

    monkeypatch.setattr(core.retention, "list_checkpoints", broken)
    with make_sync_checkpointer(_retaining(keep_last=1)) as ckpt:
        ckpt.save(tmp_path / "step_1", _state(1))
        ckpt.save(tmp_path / "step_2", _state(2))
        assert ckpt.stats.saves == 2 and ckpt.load(tmp_path / "step_2")["step"] == 2


# ---------------------------------------------------------------- 3. one load, one file


def _descriptors_of_deleted(path) -> list[str]:
    """This process's open descriptors of `path` after its removal."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"{path} (deleted)":
                found.append(fd)
        except FileNotFoundError:  # (the listing's own descriptor, closed since)
            pass
    return found


def test_a_removal_frees_in_the_background_and_never_touches_what_is_saved_there_afterwards(tmp_path):
    path, other = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    for target in (path, other):
        with open(target, "wb") as f:
            f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
    os.symlink(other, tmp_path / "link.ckpt")
    remove_file(str(tmp_path / "link.ckpt"))  # the link only, as os.remove
    assert not os.path.lexists(tmp_path / "link.ckpt") and other.exists()
    remove_file(str(path))
    assert not path.exists(), "the name must be gone when the removal returns"
    path.write_bytes(b"saved after the removal")
    wait_until_freed()
    assert path.read_bytes() == b"saved after the removal"
    assert _descriptors_of_deleted(path) == [], "the removed file was never closed: its space is not freed"
    assert "async-ckpt-free" not in {thread.name for thread in threading.enumerate()}, "its thread outlived the wait"
    with pytest.raises(FileNotFoundError):
        remove_file(str(tmp_path / "never-written.ckpt"))


def test_a_load_reads_one_file_even_when_it_is_replaced_midway(tmp_path, monkeypatch):
    """The writer replaces last.ckpt between the reader's parse and its reads of the bytes."""
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file", checksums=True))
    with make_sync_checkpointer(config) as ckpt:
        ckpt.save(tmp_path / "last.ckpt", _state(1))
        ckpt.save(tmp_path / "newer.ckpt", _state(2))
    original_fill = CheckpointReader._fill

    def replaced_meanwhile(self, ckpt, *args, **kwargs):
        os.replace(tmp_path / "newer.ckpt", tmp_path / "last.ckpt")
        return original_fill(self, ckpt, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "_fill", replaced_meanwhile)
    loaded = CheckpointReader().read(str(tmp_path / "last.ckpt"))[0]
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.full((256,), 1.0))


@pytest.mark.parametrize("checksums", [True, False])
def test_loads_while_the_file_is_overwritten_never_mix_or_fail(tmp_path, checksums):
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file", checksums=checksums))
    path = tmp_path / "last.ckpt"
    stop, problems, loads = threading.Event(), [], [0]
    with make_sync_checkpointer(config) as writer:
        writer.save(path, _state(0))

        def read_repeatedly():
            reader = CheckpointReader()
            while not stop.is_set():
                try:
                    state = reader.read(str(path))[0]
                except CheckpointError as exc:
                    problems.append(repr(exc))
                    continue
                loads[0] += 1
                if not torch.equal(state["w"], torch.full((256,), float(state["step"]))):
                    problems.append(f"step {state['step']} loaded with other tensors")

        reader = threading.Thread(target=read_repeatedly)
        reader.start()
        try:
            for step in range(1, 200):
                writer.save(path, _state(step))
        finally:
            stop.set()
            reader.join()
    assert problems == [] and loads[0] > 0


# ---------------------------------------------------------------- 4. what core writes, torch loads


def test_a_staged_state_whose_slab_was_reused_is_written_as_torch_save_writes_it(tmp_path):
    stager = DefaultStager(CheckpointStagerConfig(max_in_flight=1, in_flight_bytes=0))
    process = CheckpointProcess(None)
    try:
        first = stager.stage({"w": torch.full((8,), 1.0), "step": 1})
        stager.stage({"w": torch.full((8,), 2.0), "step": 2})  # same shape: reuses the slab
        process.write(first, str(tmp_path / "first")).result()
    finally:
        process.close()
        stager.close()
    loaded = torch.load(tmp_path / "first" / "checkpoint_0.pt", weights_only=True)
    assert type(loaded) is dict and loaded["step"] == 1 and torch.equal(loaded["w"], torch.full((8,), 1.0))


def test_two_threads_saving_through_one_checkpointer_write_loadable_files(tmp_path):
    one_slab = CheckpointerConfig(staging_config=CheckpointStagerConfig(max_in_flight=1, in_flight_bytes=0))
    with make_async_checkpointer(one_slab) as ckpt:  # one staging slab: the threads' saves take it from each other

        def save_many(name):
            for n in range(48):
                ckpt.save(tmp_path / f"{name}_{n}", {"w": torch.full((64,), float(n)), "n": n})

        threads = [threading.Thread(target=save_many, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for folder in tmp_path.iterdir():
        loaded = torch.load(folder / "checkpoint_0.pt", weights_only=True)
        assert torch.equal(loaded["w"], torch.full((64,), float(loaded["n"])))


# ---------------------------------------------------------------- 5, 6, 9: the manifest and commit.json


@pytest.fixture
def saved(tmp_path):
    with make_sync_checkpointer() as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.arange(1000.0), "step": 3})
    return tmp_path / "ck"


def _refused_everywhere(path, match=None):
    with pytest.raises(CorruptCheckpointError, match=match):
        make_sync_checkpointer().load(path)
    code, said = _printed(run_cli("verify", path))
    assert code == 1 and "Traceback" not in said, said


def test_an_unknown_checksum_name_is_damage_not_no_checksums(saved):
    file = saved / "checkpoint_0.pt"

    def rename(manifest):
        manifest["checksum"] = "xxh3_74"

    hostile.edit_manifest(file, rename)
    flip_byte(file, "data/0", at=8)
    _refused_everywhere(saved, match="checksum algorithm")


def test_the_manifest_s_own_crc_is_checked(saved):
    def change_a_digest(manifest):
        digest = manifest["storages"]["0"]["digests"][0]
        manifest["storages"]["0"]["digests"][0] = digest[:-1] + ("0" if digest[-1] != "0" else "1")

    hostile.edit_manifest(saved / "checkpoint_0.pt", change_a_digest, keep_crc_valid=False)
    _refused_everywhere(saved, match="CRC-32")


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(chunk_bytes=0),
        lambda m: m.update(chunk_bytes="x"),
        lambda m: m["storages"].pop("0"),
        lambda m: m["storages"]["0"].update(nbytes=-1),
        lambda m: m["storages"]["0"]["digests"].pop(),
        lambda m: m.update(storages=[]),
        lambda m: m["data.pkl"].pop("digest"),
    ],
    ids=["chunk_bytes_0", "chunk_bytes_str", "storage_missing", "negative_size", "digest_missing", "list", "no_pkl"],
)
def test_a_manifest_edit_with_a_matching_crc_is_a_clear_error(saved, edit):
    hostile.edit_manifest(saved / "checkpoint_0.pt", edit)
    _refused_everywhere(saved, match="manifest")


@pytest.mark.parametrize("name", ["../other/checkpoint_0.pt", "/etc/passwd", "..", "sub/checkpoint_0.pt"])
def test_a_commit_record_names_only_files_inside_its_folder(tmp_path, name):
    with make_sync_checkpointer() as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.zeros(3)})
        ckpt.save(tmp_path / "other", {"w": torch.ones(3)})
    record = json.loads((tmp_path / "ck" / "commit.json").read_text())
    record["files"][0]["file"] = name
    record["files"][0]["write_id"] = json.loads((tmp_path / "other" / "commit.json").read_text())["files"][0][
        "write_id"
    ]
    (tmp_path / "ck" / "commit.json").write_text(json.dumps(record))
    _refused_everywhere(tmp_path / "ck", match="inside the checkpoint folder")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "yesterday", None])
def test_an_odd_commit_time_is_damage_and_ls_lists_it(tmp_path, value):
    with make_sync_checkpointer() as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.zeros(3)})
    record = json.loads((tmp_path / "ck" / "commit.json").read_text())
    record["committed_at"] = value
    (tmp_path / "ck" / "commit.json").write_text(json.dumps(record))
    code, said = _printed(run_cli("ls", tmp_path))
    assert code == 0 and "INCOMPLETE" in said and "committed_at" in said, said
    assert find_latest(tmp_path) is None


def test_a_strict_load_through_a_reader_of_torch_s_shape_raises_on_missing_keys(tmp_path):
    class TorchShapedReader(CheckpointReader):
        def read(self, path, state_dict=None, *, map_location=None, **kwargs):
            kwargs.pop("strict", None)  # torch's reader reports missing keys and leaves strictness to the caller
            return super().read(path, state_dict, map_location=map_location, **kwargs)

    ckpt = SyncCheckpointer(CheckpointWriter(), TorchShapedReader())
    with ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.zeros(3)})
        with pytest.raises(MissingKeysError, match="absent"):
            ckpt.load(tmp_path / "ck", {"w": torch.ones(3), "absent": torch.ones(1)}, strict=True)


def test_a_writer_init_function_that_cannot_be_pickled_fails_with_the_cause():
    process = CheckpointProcess(None, checkpoint_writer_init_fn=lambda **kwargs: None)
    try:
        with pytest.raises(WriterStartError, match="cannot be pickled"):
            process.process_creation_future.result(timeout=120)
    finally:
        process.close()


def test_a_typo_in_a_load_keyword_is_not_silent(saved):
    with pytest.warns(UserWarning, match="weight_only"):
        make_sync_checkpointer().load(saved, weight_only=True)


def writer_init_defined_in_main(**kwargs):
    raise AssertionError("never called: the writer cannot import this function")


def test_a_writer_init_function_the_writer_cannot_import_fails_at_once_with_the_cause(monkeypatch):
    import __main__

    # As if the training script defined it: this process pickles it by name, the writer cannot find it.
    monkeypatch.setattr(writer_init_defined_in_main, "__module__", "__main__")
    monkeypatch.setattr(__main__, "writer_init_defined_in_main", writer_init_defined_in_main, raising=False)
    process = CheckpointProcess(None, checkpoint_writer_init_fn=writer_init_defined_in_main)
    try:
        with pytest.raises(WriterStartError, match="cannot unpickle") as failure:
            process.process_creation_future.result(timeout=120)  # long before the 30 s start timeout matters
        assert "__main__" in str(failure.value)
    finally:
        process.close()


# ---------------------------------------------------------------- 7. hostile files


@pytest.mark.parametrize(
    "offset, size, stride",
    [(0, (4,), (-1,)), (0, (2**62, 2**62), (1, 1)), (0, (2**40,), (1,)), (0, (100,), (1,)), (3, (2,), (1,))],
    ids=["negative_stride", "overflowing_dims", "4_tib_claim", "beyond_the_record", "offset_beyond"],
)
def test_a_tensor_that_does_not_fit_its_record_is_refused_everywhere(tmp_path, offset, size, stride):
    path = tmp_path / "forged.pt"
    hostile.forged_tensor_file(path, offset, size, stride)
    with pytest.raises(CorruptCheckpointError):
        make_sync_checkpointer().load(path)
    for command in (["verify", path], ["inspect", path]):
        code, said = _printed(run_cli(*command))
        assert code == 1 and "Traceback" not in said, (command, said)
    code, said = _printed(run_cli("ls", tmp_path))
    assert code == 0 and "INCOMPLETE" in said, said
    assert find_latest(tmp_path) is None


def test_a_stride_0_tensor_of_2_to_the_40_elements_loads_and_diffs_at_once(tmp_path):
    for name, value in (("a.pt", 4), ("b.pt", 5)):
        hostile.forged_tensor_file(tmp_path / name, 0, (2**40,), (0,), elements=value)
    assert make_sync_checkpointer().load(tmp_path / "a.pt")["x"].shape == (2**40,)  # as torch.load gives it
    assert _printed(run_cli("diff", tmp_path / "a.pt", tmp_path / "a.pt"))[0] == 0
    code, said = _printed(run_cli("diff", tmp_path / "a.pt", tmp_path / "b.pt"))  # views of different memory
    assert code == 1 and "x" in said, said


def test_a_structure_sharing_one_list_at_every_level_stays_bounded(tmp_path):
    path = tmp_path / "bomb.pt"
    hostile.shared_reference_bomb(path, levels=60)  # 2**60 paths
    ckpt = make_sync_checkpointer()
    assert torch.equal(ckpt.load(path)["w"], torch.ones(3))
    assert ckpt.load(path, {"x": None, "w": torch.zeros(3)})["x"][0] is not None
    assert ckpt.load(path, map_location="cpu")["x"][0][0] is not None
    for command in (["inspect", path], ["diff", path, path], ["verify", path], ["ls", tmp_path]):
        code, said = _printed(run_cli(*command))
        assert code == 0 and "Traceback" not in said, (command, said[-500:])


def test_deep_nesting_is_no_traceback(tmp_path):
    path = tmp_path / "deep.pt"
    hostile.deep_nesting(path)
    ckpt = make_sync_checkpointer()
    ckpt.load(path)  # as torch.load, which builds it too
    try:
        ckpt.load(path, map_location=lambda storage, location: storage)
    except CheckpointError:
        pass
    for command in (["inspect", path], ["diff", path, path], ["verify", path], ["ls", tmp_path]):
        code, said = _printed(run_cli(*command))
        assert code in (0, 1) and "Traceback" not in said, (command, said[-500:])


@pytest.mark.slow
def test_the_fuzzer_finds_nothing(tmp_path):
    """Flipped, truncated, extended, swapped and zeroed bytes in every part of a checkpoint:
    the saved values or a CheckpointError from every reader, in bounded time and memory."""
    result = run_script("fuzz_checkpoints.py", tmp_path, 2026, 300, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["violations"] == [], report["violations"][:5]
    assert report["outcomes"].get("loaded", 0) > 0 and report["outcomes"].get("CorruptCheckpointError", 0) > 0


# ---------------------------------------------------------------- 8. a nearly full disk


@pytest.fixture
def small_filesystem(tmp_path):
    with small_tmpfs(tmp_path, "1m") as mount_point:
        yield mount_point


@pytest.mark.slow
def test_every_level_of_free_space_is_a_clear_error_and_the_process_lives(small_filesystem):
    result = run_script("fault_scripts.py", "disk_full_levels", small_filesystem, timeout=600)
    assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 2 * 12, result.stdout
    for line in lines:
        assert line.endswith("ENOSPC ok"), line
