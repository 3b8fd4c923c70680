"""The zip skeleton of a checkpoint file, laid out by torch's writer once per shape and filled in
for each later save: every byte outside the storages is what torch's writer lays out for the same
records, and every file loads with torch.load and our reader."""

import io
import os
import sys
import zipfile

import pytest
import torch

from core import (
    CheckpointerConfig,
    CheckpointReader,
    CheckpointWriterConfig,
    make_sync_checkpointer,
    torch_internals,
    zip_skeleton,
)
from core.fsutil import PAGE_SIZE
from core.manifest import MANIFEST_RECORD
from tests.helpers import assert_same


def _state(seed: int, step: int, rows: int = 64) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(rows, 32, generator=generator), "b": torch.randn(32, generator=generator)},
        "empty": torch.zeros(0),
        "step": step,
    }


def _save(path, state) -> None:
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file"))
    with make_sync_checkpointer(config) as ckpt:
        ckpt.save(path, state)


def _laid_out_by_torch(path, archive: zipfile.ZipFile, prefix: str) -> bytes:
    """What torch's own writer lays out at `path` for the records of `archive` (storages left out)."""
    writer = torch_internals.FileWriter(str(path), True, PAGE_SIZE)
    for info in archive.infolist():
        name = info.filename.removeprefix(prefix)
        if name.startswith("data/"):
            torch_internals.reserve_record(writer, name, info.file_size)
        elif name not in ("version", ".data/serialization_id"):  # torch writes these two at the end
            data = archive.read(info)
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    return path.read_bytes()


def _outside_storages(data: bytes, archive: zipfile.ZipFile, prefix: str) -> bytes:
    """`data` with every storage record's bytes zeroed."""
    data = bytearray(data)
    for info in archive.infolist():
        if info.filename.removeprefix(prefix).startswith("data/"):
            start = info.header_offset + 30 + len(info.filename.encode()) + len(_local_extra(data, info))
            data[start : start + info.file_size] = bytes(info.file_size)
    return bytes(data)


def _local_extra(data: bytearray, info: zipfile.ZipInfo) -> bytes:
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length
    return bytes(data[start : start + extra_length])


@pytest.mark.parametrize("rows", [64, 1 << 19], ids=["small file, written at once", "large file, in chunks"])
@pytest.mark.parametrize(
    "first, second",
    [("last.pt", "last.pt"), ("lost.pt", "last.pt"), ("é.pt", "ab.pt")],
    ids=["same name", "another name of its length", "as many bytes, other characters"],
)
def test_a_save_of_a_shape_saved_before_is_what_torchs_writer_lays_out(tmp_path, monkeypatch, rows, first, second):
    monkeypatch.setattr(zip_skeleton, "_templates", zip_skeleton._Templates())  # none laid out by earlier tests
    _save(tmp_path / "first" / first, _state(0, 7, rows))  # lays the shape out
    state = _state(1, 8, rows)  # the same shapes: its pickle differs in the step only, its manifest in its digests
    path = tmp_path / "second" / second
    _save(path, state)
    written = path.read_bytes()
    archive = zipfile.ZipFile(io.BytesIO(written))
    prefix = second.removesuffix(".pt") + "/"
    assert archive.namelist()[0] == prefix + "data.pkl"
    os.mkdir(tmp_path / "torch")
    expected = _laid_out_by_torch(tmp_path / "torch" / second, archive, prefix)
    assert len(expected) == len(written)
    assert _outside_storages(written, archive, prefix) == _outside_storages(expected, archive, prefix)
    assert MANIFEST_RECORD in {i.filename.removeprefix(prefix) for i in archive.infolist()}
    assert_same(torch.load(path, weights_only=True), state)
    assert_same(CheckpointReader().read(str(path))[0], state)


NAMES = ["a.pt", "a.pt", "b.c.pt", "a.pt", "x.", "noext", "..pt", "é ü.pt", "é ü.pt", os.fsdecode(b"\xff\xfe.pt")]


def test_every_shape_and_name_loads_and_names_its_archive_folder_as_torch_save_does(tmp_path):
    for n, name in enumerate(NAMES):
        state = _state(n, n) if n != 3 else {**_state(n, n), "extra": torch.ones(3)}
        path = tmp_path / str(n) / name
        _save(path, state)
        assert_same(torch.load(path, weights_only=True), state)
        assert_same(CheckpointReader().read(str(path))[0], state)
        torch.save(state, tmp_path / str(n) / f"torch-{name}")
        folder = zipfile.ZipFile(tmp_path / str(n) / f"torch-{name}").namelist()[0].removesuffix("data.pkl")
        assert zipfile.ZipFile(path).namelist()[0] == folder.replace("torch-", "", 1) + "data.pkl"
    assert sys.byteorder in zipfile.ZipFile(tmp_path / "3" / "a.pt").read("a/byteorder").decode()


def test_a_name_torch_save_refuses_is_saved_all_the_same(tmp_path):
    with pytest.raises(RuntimeError, match="invalid file name"):
        torch.save(_state(0, 0), tmp_path / ".hidden")
    _save(tmp_path / "ours" / ".hidden", _state(0, 0))
    assert zipfile.ZipFile(tmp_path / "ours" / ".hidden").namelist()[0] == "archive/data.pkl"
    assert_same(torch.load(tmp_path / "ours" / ".hidden", weights_only=True), _state(0, 0))
