"""The sharded format in one process: DCP's own files, our index, and what a hostile file gets.

A one-rank sharded checkpoint is planned from plain tensors (rank 0 writes them, as in a job)
and written by the real CheckpointWriter; the multi-rank behaviour is in test_sharded.py.
"""

import io
import json
import os
import pickle
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp

from core import CheckpointReader, CheckpointWriter, CorruptCheckpointError, UnsafeCheckpointError
from core.capture import tensor_pickle
from core.dcp_format import ShardedItem, _tensor_archive
from core.sharded_load import open_sharded
from core.sharded_plan import capture_sharded
from core.types import RankInfo
from tests.helpers import assert_same


def state() -> dict:
    return {
        "model": {"w": torch.randn(300, 1000), "b": torch.arange(7, dtype=torch.bfloat16), "n": torch.tensor(3)},
        "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}], "empty": torch.zeros(0, 4)},
        "step": 12,
    }


def save_sharded(path, value) -> None:
    captured = capture_sharded(value, rank=0)
    writer = CheckpointWriter(rank_info=RankInfo(0, 1))
    try:
        writer.write_staged(str(path), captured.plan, [s.contiguous() for s in captured.sources], step=12)
    finally:
        writer.close()


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((), torch.int64), ((2, 0), torch.float16)])
def test_an_items_archive_is_laid_out_as_torch_save_lays_it_out(shape, dtype):
    tensor = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.float64)[: torch.Size(shape).numel()]
    tensor = tensor.to(dtype).reshape(shape)
    data = tensor.view(-1).view(torch.uint8) if tensor.numel() else torch.zeros(0, dtype=torch.uint8)
    item = ShardedItem("x", dtype, tuple(shape), (0,) * len(shape), tuple(shape), 0)
    pieces, data_start, length = _tensor_archive(item, data.numel(), 64)
    archive = bytearray(length)
    for offset, piece in pieces:
        archive[offset : offset + len(piece)] = piece
    archive[data_start : data_start + data.numel()] = bytes(data)
    saved = io.BytesIO()
    torch.save(tensor, saved)
    ours, torchs = zipfile.ZipFile(io.BytesIO(bytes(archive))), zipfile.ZipFile(saved)
    layout = [(i.filename, i.header_offset, i.file_size, i.compress_type) for i in ours.infolist()]
    assert layout == [(i.filename, i.header_offset, i.file_size, i.compress_type) for i in torchs.infolist()]
    for info in torchs.infolist():
        # Storage records carry CRC 0 (see file_writer.py); every archive gets its own serialization id.
        if not info.filename.endswith(("/data/0", "/serialization_id")):
            assert ours.getinfo(info.filename).CRC == info.CRC and ours.read(info) == torchs.read(info)
    assert len(archive) == len(saved.getvalue())
    assert torch.equal(torch.load(io.BytesIO(bytes(archive)), weights_only=True), tensor)
    assert tensor_pickle(dtype, tuple(shape)) in saved.getvalue()


def test_a_one_rank_sharded_checkpoint_is_read_by_stock_dcp_and_by_us(tmp_path):
    value = state()
    save_sharded(tmp_path / "ckpt", value)
    whole, missing = CheckpointReader().read(str(tmp_path / "ckpt"))
    assert missing == []
    assert_same(whole, value)
    target = {
        "model": {"w": torch.zeros(300, 1000), "b": torch.zeros(7, dtype=torch.bfloat16), "n": torch.tensor(0)},
        "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}], "empty": torch.zeros(0, 4)},
        "step": 0,
    }
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert_same(target, value)


def test_to_torch_save_writes_one_plain_file_of_the_whole_or_one_key(tmp_path):
    from core import to_torch_save

    value = state()
    save_sharded(tmp_path / "ckpt", value)
    to_torch_save(str(tmp_path / "ckpt"), str(tmp_path / "all.pt"))
    assert_same(torch.load(tmp_path / "all.pt", weights_only=True), value)
    to_torch_save(str(tmp_path / "ckpt"), str(tmp_path / "model.pt"), key="model")
    assert_same(torch.load(tmp_path / "model.pt", weights_only=True), value["model"])
    with pytest.raises(KeyError, match="no top-level key 'nope'"):
        to_torch_save(str(tmp_path / "ckpt"), str(tmp_path / "x.pt"), key="nope")
    assert not os.path.exists(tmp_path / "x.pt")


def test_a_partial_load_reads_only_what_it_names_and_strict_names_what_is_missing(tmp_path):
    from core import MissingKeysError

    value = state()
    save_sharded(tmp_path / "ckpt", value)
    target = {"model": {"b": torch.zeros(7, dtype=torch.bfloat16), "extra": torch.zeros(2)}}
    _, missing = CheckpointReader().read(str(tmp_path / "ckpt"), target)
    assert missing == ["model.extra"] and torch.equal(target["model"]["b"], value["model"]["b"])
    with pytest.raises(MissingKeysError, match="model.extra"):
        CheckpointReader().read(str(tmp_path / "ckpt"), target, strict=True)
    with pytest.raises(ValueError, match="model.w.*shape \\(300, 1000\\)"):
        CheckpointReader().read(str(tmp_path / "ckpt"), {"model": {"w": torch.zeros(3)}})


def _index(checkpoint) -> tuple[dict, str]:
    record = json.loads((checkpoint / "commit.json").read_text())
    return record, record["index_file"]


def test_a_changed_index_is_refused_and_a_changed_data_byte_is_named(tmp_path):
    save_sharded(tmp_path / "ckpt", state())
    checkpoint = tmp_path / "ckpt"
    record, index_name = _index(checkpoint)
    index = json.loads((checkpoint / index_name).read_text())
    item = next(i for i in index["items"] if i["fqn"] == "model.w")
    with open(checkpoint / item["file"], "r+b") as f:  # one byte of the tensor's data
        f.seek(item["data_offset"] + 4 * 1000 * 150)
        f.write(b"\x7f")
    with pytest.raises(CorruptCheckpointError, match="model.w"):
        CheckpointReader().read(str(checkpoint))
    assert CheckpointReader().read(str(checkpoint), {"step": None})[0]["step"] == 12  # other items still load
    item["sizes"] = [1, 1000]  # the index itself edited: its digest no longer matches the commit record
    (checkpoint / index_name).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="does not match the digest"):
        CheckpointReader().read(str(checkpoint))


@pytest.mark.parametrize(
    "change",
    [
        lambda item: item.update(file="../outside.distcp"),
        lambda item: item.update(data_offset=1 << 40),
        lambda item: item.update(offsets=[0]),
        lambda item: item.update(sizes=[300, 2000]),
        lambda item: item.update(dtype="not_a_dtype"),
        lambda item: item.update(digests=[]),
    ],
)
def test_a_hostile_index_with_a_matching_digest_never_loads_wrong_data(tmp_path, change):
    from core.manifest import digest

    save_sharded(tmp_path / "ckpt", state())
    checkpoint = tmp_path / "ckpt"
    record, index_name = _index(checkpoint)
    index = json.loads((checkpoint / index_name).read_text())
    change(next(i for i in index["items"] if i["fqn"] == "model.w"))
    raw = json.dumps(index).encode()
    (checkpoint / index_name).write_bytes(raw)
    record["index_digest"] = digest(raw)
    (checkpoint / "commit.json").write_text(json.dumps(record))
    with pytest.raises((CorruptCheckpointError, ValueError)):
        CheckpointReader().read(str(checkpoint))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/async_ckpt_pwned",))


def test_a_stock_dcp_metadata_holding_other_objects_is_refused_unrun(tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        CheckpointReader().read(str(folder))
    assert not os.path.exists("/tmp/async_ckpt_pwned")
    assert open_sharded(str(tmp_path)) is None  # a folder of checkpoints is not itself one
