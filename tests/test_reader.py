"""Partial and strict loads, verification, and a distinct clear error for each kind of bad file."""

import os
import pickle
import zipfile

import pytest
import torch

import core.manifest
from core import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingKeysError,
    NotACheckpointError,
    UnsupportedFormatVersionError,
    make_sync_checkpointer,
)
from tests.helpers import flip_byte


@pytest.fixture
def ckpt():
    with make_sync_checkpointer() as checkpointer:
        yield checkpointer


def _state(n_tensors=20, numel=1 << 16):
    return {"model": {f"layer{i}.weight": torch.full((numel,), float(i)) for i in range(n_tensors)}, "step": 11}


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def test_partial_load_reads_only_requested_tensors_in_place(tmp_path, ckpt):
    ckpt.save(tmp_path / "ck", _state())
    file_size = os.path.getsize(tmp_path / "ck" / "checkpoint_0.pt")
    target = {"model": {"layer3.weight": torch.zeros(1 << 16), "layer7.weight": torch.zeros(1 << 16)}}
    destination = target["model"]["layer3.weight"]
    before = _read_bytes()
    loaded = ckpt.load(tmp_path / "ck", target)
    read = _read_bytes() - before
    assert loaded is target and target["model"]["layer3.weight"] is destination
    assert torch.all(destination == 3) and torch.all(target["model"]["layer7.weight"] == 7)
    assert read < 0.15 * file_size, f"read {read} of {file_size} bytes for 10% of the tensors"


def test_strict_load_names_missing_keys(tmp_path, ckpt):
    ckpt.save(tmp_path / "ck", _state(2))
    target = {"model": {"layer0.weight": torch.zeros(1 << 16), "layer9.weight": torch.zeros(1)}, "epoch": None}
    with pytest.raises(RuntimeError, match="missing keys") as info:  # as torch's checkpointer raises
        ckpt.load(tmp_path / "ck", target, strict=True)
    assert isinstance(info.value, MissingKeysError)
    assert "model.layer9.weight" in str(info.value) and "epoch" in str(info.value)
    loaded = ckpt.load(tmp_path / "ck", target)  # not strict: loads what is there
    assert torch.all(loaded["model"]["layer0.weight"] == 0.0)


def test_non_tensor_values_are_replaced_and_their_tensors_read(tmp_path, ckpt):
    ckpt.save(tmp_path / "ck", {"step": 5, "extra": [torch.arange(3)]})
    target = {"step": 0, "extra": None}
    ckpt.load(tmp_path / "ck", target)
    assert target["step"] == 5 and torch.equal(target["extra"][0], torch.arange(3))


def test_shape_or_dtype_mismatch_names_the_key(tmp_path, ckpt):
    ckpt.save(tmp_path / "ck", _state(2))
    with pytest.raises(ValueError, match="model.layer1.weight.*shape"):
        ckpt.load(tmp_path / "ck", {"model": {"layer1.weight": torch.zeros(3)}})
    with pytest.raises(ValueError, match="model.layer1.weight.*dtype"):
        ckpt.load(tmp_path / "ck", {"model": {"layer1.weight": torch.zeros(1 << 16, dtype=torch.float64)}})


def test_missing_path(tmp_path, ckpt):
    with pytest.raises(CheckpointNotFoundError, match="does-not-exist"):
        ckpt.load(tmp_path / "does-not-exist")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not committed: it has no commit.json"):
        ckpt.load(tmp_path / "empty_dir")


def test_truncated_file(tmp_path, ckpt):
    ckpt.save(tmp_path / "ck", _state(4))
    path = tmp_path / "ck" / "checkpoint_0.pt"
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        ckpt.load(tmp_path / "ck")


def test_flipped_byte_in_tensor_data_names_the_tensor(tmp_path, ckpt):
    ckpt.save(tmp_path / "ck", _state(4))
    path = tmp_path / "ck" / "checkpoint_0.pt"
    flip_byte(path, "data/2", at=100)
    with pytest.raises(CorruptCheckpointError) as info:
        ckpt.load(tmp_path / "ck")
    assert "data/2" in str(info.value) and "model.layer2.weight" in str(info.value)
    # A partial load of undamaged tensors still works.
    ok = ckpt.load(tmp_path / "ck", {"model": {"layer0.weight": torch.empty(1 << 16)}})
    assert torch.all(ok["model"]["layer0.weight"] == 0)
    with pytest.raises(CorruptCheckpointError):
        ckpt.load(tmp_path / "ck", {"model": {"layer2.weight": torch.empty(1 << 16)}})


def test_flipped_byte_in_structure(tmp_path, ckpt):
    ckpt.save(tmp_path / "ck", _state(2))
    path = tmp_path / "ck" / "checkpoint_0.pt"
    flip_byte(path, "data.pkl", at=10)
    with pytest.raises(CorruptCheckpointError, match="data.pkl"):
        ckpt.load(tmp_path / "ck")


def test_not_a_checkpoint(tmp_path, ckpt):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotACheckpointError, match="not a PyTorch checkpoint"):
        ckpt.load(tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "a zip, but not torch's")
    with pytest.raises(NotACheckpointError):
        ckpt.load(tmp_path / "other.zip")


def test_newer_format_version(tmp_path, ckpt, monkeypatch):
    monkeypatch.setattr(core.manifest, "FORMAT_VERSION", core.manifest.FORMAT_VERSION + 1)
    ckpt.save(tmp_path / "ck", _state(1))
    monkeypatch.undo()
    with pytest.raises(UnsupportedFormatVersionError, match="upgrade"):
        ckpt.load(tmp_path / "ck")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_never_runs_code_from_the_file(tmp_path, ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"payload": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        ckpt.load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_plain_torch_save_files_load(tmp_path, ckpt):
    state = {"a": torch.randn(3, 3), "b": [torch.ones(2)], "n": 4}
    torch.save(state, tmp_path / "plain.pt")
    loaded = ckpt.load(tmp_path / "plain.pt")
    assert torch.equal(loaded["a"], state["a"]) and loaded["n"] == 4


def test_a_commit_record_that_is_not_an_object_is_a_clear_error(tmp_path, ckpt):
    ckpt.save(tmp_path / "ck", _state(1))
    (tmp_path / "ck" / "commit.json").write_text("[1, 2, 3]")
    with pytest.raises(CorruptCheckpointError, match="not an object"):
        ckpt.load(tmp_path / "ck")
    assert core.find_latest(tmp_path) is None


def test_a_structure_that_claims_huge_storages_is_refused_before_allocating(tmp_path, ckpt):
    torch.save({"w": torch.ones(4)}, tmp_path / "huge.pt")
    with zipfile.ZipFile(tmp_path / "huge.pt") as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(name for name in records if name.endswith("data.pkl"))
    records[pkl] = records[pkl].replace(b"K\x04", b"\x8a\x06\x00\x00\x00\x00\x00\x01", 1)  # numel 4 -> 2**40
    with zipfile.ZipFile(tmp_path / "huge.pt", "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    with pytest.raises(CorruptCheckpointError, match="claims"):
        ckpt.load(tmp_path / "huge.pt")
