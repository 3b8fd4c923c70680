"""Every dtype and structure survives a save and load bit-exactly, through our reader and torch.load."""

import os

import pytest
import torch

import core
from core import CheckpointerConfig, CheckpointWriterConfig, make_async_checkpointer, make_sync_checkpointer
from tests.helpers import Box, Point, assert_same, clone_tree, every_dtype_tensors, small_training_state


@pytest.fixture(scope="module")
def async_ckpt():
    with make_async_checkpointer() as ckpt:
        yield ckpt


def test_public_api_names():
    for name in [
        "Checkpointer", "SyncCheckpointer", "AsyncCheckpointer", "CheckpointStager", "DefaultStager",
        "CheckpointStagerConfig", "CheckpointProcess", "CheckpointProcessConfig", "CheckpointWriter",
        "CheckpointWriterConfig", "WriterHook", "CheckpointReader", "Barrier", "BarrierConfig", "DistBarrier",
        "TCPStoreBarrier", "CheckpointerConfig", "RankInfo", "make_sync_checkpointer", "make_async_checkpointer",
    ]:
        assert hasattr(core, name), name


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_every_dtype_round_trips_bit_exactly(tmp_path, async_ckpt, mode):
    state = every_dtype_tensors()
    expected = clone_tree(state)
    if mode == "async":
        _, written = async_ckpt.save(tmp_path / "ck", state)
        written.result()
        loaded = async_ckpt.load(tmp_path / "ck")
    else:
        with make_sync_checkpointer() as ckpt:
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
            assert ckpt.save(tmp_path / "ck", state) is None  # as torch's SyncCheckpointer
            assert ckpt.stats.last.nbytes == sum(storages.values())
            loaded = ckpt.load(tmp_path / "ck")
    assert_same(loaded, expected)
    plain = torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)
    assert_same(plain, expected)


def test_structures_keep_their_types(tmp_path, async_ckpt):
    model, optimizer = small_training_state()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "nested": {"list": [1, 2.5, "three", torch.ones(2)], "tuple": (torch.zeros(3), None, True)},
        "point": Point(torch.arange(3), 7),
        "box": Box(4, torch.full((2, 2), 9.0)),
        "epoch": 3,
    }
    expected = clone_tree(state)
    async_ckpt.save(tmp_path / "ck", state)[1].result()
    with torch.serialization.safe_globals([Point, Box]):
        loaded = async_ckpt.load(tmp_path / "ck")
        plain = torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)
    assert_same(loaded, expected)
    assert_same(plain, expected)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])


def test_tied_weights_and_views_keep_sharing(tmp_path, async_ckpt):
    weight = torch.randn(10, 4)
    state = {"embed": weight, "lm_head": weight, "transposed": weight.t(), "rows": weight[2:5]}
    async_ckpt.save(tmp_path / "ck", state)[1].result()
    for loaded in (
        async_ckpt.load(tmp_path / "ck"),
        torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True),
    ):
        assert loaded["embed"] is loaded["lm_head"]
        ptr = loaded["embed"].untyped_storage().data_ptr()
        assert loaded["transposed"].untyped_storage().data_ptr() == ptr
        assert loaded["rows"].untyped_storage().data_ptr() == ptr
        loaded["embed"][3, 0] = 123.0
        assert loaded["rows"][1, 0] == 123.0 and loaded["transposed"][0, 3] == 123.0


def test_parameters_stay_parameters(tmp_path, async_ckpt):
    parameter = torch.nn.Parameter(torch.randn(3, 3))
    async_ckpt.save(tmp_path / "ck", {"p": parameter, "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False)})[1].result()
    loaded = async_ckpt.load(tmp_path / "ck")
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    assert not loaded["frozen"].requires_grad
    assert torch.equal(loaded["p"], parameter)


def test_single_file_layout_writes_exactly_the_path(tmp_path):
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file"))
    target = tmp_path / "epoch=1-step=10.ckpt"
    with make_async_checkpointer(config) as ckpt:
        ckpt.save(target, {"w": torch.arange(4)})[1].result()
        assert sorted(os.listdir(tmp_path)) == ["epoch=1-step=10.ckpt"]
        assert torch.equal(ckpt.load(target)["w"], torch.arange(4))
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(4))


def test_large_tensor_spans_several_chunks(tmp_path):
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(chunk_bytes=1 << 16))
    state = {"big": torch.randn(100_000), "small": torch.randn(3)}
    with make_async_checkpointer(config) as ckpt:
        ckpt.save(tmp_path / "ck", state)[1].result()
        assert_same(ckpt.load(tmp_path / "ck"), state)


def test_map_location_moves_tensors_and_keeps_sharing(tmp_path, async_ckpt):
    weight = torch.randn(4, 4)
    async_ckpt.save(tmp_path / "ck", {"a": weight, "b": weight.t()})[1].result()
    loaded = async_ckpt.load(tmp_path / "ck", default_map_location="cpu")
    assert loaded["a"].device.type == "cpu"
    assert loaded["b"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_safetensors_files_load_with_safetensors(tmp_path, async_ckpt, mode):
    from safetensors.torch import load_file

    state = {k: v for k, v in every_dtype_tensors().items() if not k.startswith("complex") and k != "nan_payload"}
    target = tmp_path / "model.safetensors"
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file"))
    if mode == "async":
        with make_async_checkpointer(config) as ckpt:
            ckpt.save(target, state, file_format="safetensors")[1].result()
    else:
        with make_sync_checkpointer(config) as ckpt:
            ckpt.save(target, state, file_format="safetensors")
    loaded = load_file(target)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)), name


def test_callable_map_location_is_applied(tmp_path, async_ckpt):
    async_ckpt.save(tmp_path / "ck", {"a": torch.ones(2)})[1].result()
    seen = []
    loaded = async_ckpt.load(tmp_path / "ck", default_map_location=lambda storage, loc: seen.append(loc) or storage)
    assert seen == ["cpu"] and torch.equal(loaded["a"], torch.ones(2))
