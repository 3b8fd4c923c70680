"""Every dtype and structure survives a save and load bit-exactly, through our reader and torch.load."""

import mmap
import os
import shutil
import tempfile

import pytest
import torch

import core
from core import (
    CheckpointerConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from core.aligned_write import DIRECT_MIN_BYTES, _plan, _segments, write_whole_file
from core.fsutil import PAGE_SIZE, round_up
from core.parallel_io import Chunk, _balanced_groups
from tests.helpers import Box, Point, assert_same, clone_tree, every_dtype_tensors, small_training_state


@pytest.fixture(scope="module")
def async_ckpt(tmp_path_factory):
    with make_async_checkpointer() as ckpt:
        # One save first: the threads the checkpointer keeps (staging, spare-slab warming) exist
        # before the first test, so the per-test leak check does not count them as that test's.
        ckpt.save(tmp_path_factory.mktemp("warm") / "ck", {"w": torch.ones(4)})[1].result()
        yield ckpt


def test_public_api_names():
    for name in [
        "Checkpointer",
        "SyncCheckpointer",
        "AsyncCheckpointer",
        "CheckpointStager",
        "DefaultStager",
        "CheckpointStagerConfig",
        "CheckpointProcess",
        "CheckpointProcessConfig",
        "CheckpointWriter",
        "CheckpointWriterConfig",
        "WriterHook",
        "CheckpointReader",
        "Barrier",
        "BarrierConfig",
        "DistBarrier",
        "TCPStoreBarrier",
        "CheckpointerConfig",
        "RankInfo",
        "make_sync_checkpointer",
        "make_async_checkpointer",
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
    async_ckpt.save(
        tmp_path / "ck", {"p": parameter, "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False)}
    )[1].result()
    loaded = async_ckpt.load(tmp_path / "ck")
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    assert not loaded["frozen"].requires_grad
    assert torch.equal(loaded["p"], parameter)


def test_saves_of_the_same_tensors_copy_each_one_as_it_is_now(tmp_path):
    # Repeated saves of one structure copy each tensor straight into its typed place in the
    # staging memory: parameters (whose copies must not join their autograd graph), a storage
    # that a later tensor covers whole but a first one only views, conjugate and negative bits.
    one_slab = CheckpointerConfig(staging_config=CheckpointStagerConfig(max_in_flight=1, in_flight_bytes=0))
    with make_async_checkpointer(one_slab) as ckpt:
        _save_the_same_tensors_again_and_again(tmp_path, ckpt)


def _save_the_same_tensors_again_and_again(tmp_path, async_ckpt):
    weight = torch.nn.Parameter(torch.randn(6, 4))
    base = torch.randn(8)
    z, other = torch.randn(3, dtype=torch.complex64), torch.randn(3, dtype=torch.complex64)
    state = {
        "weight": weight,
        "rows": base[2:5],
        "base": base,
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(5, dtype=torch.bfloat16),
        "conj": z.conj(),
        "neg": other.conj().imag,
        "transposed": torch.randn(3, 5).t(),
    }
    for step in range(4):
        with torch.no_grad():
            weight.add_(1.0)
            base.mul_(2.0)
            z.add_(1j)
            other.sub_(1j)
        async_ckpt.save(tmp_path / f"ck{step}", state)[1].result()
        loaded = torch.load(tmp_path / f"ck{step}" / "checkpoint_0.pt", weights_only=True)
        assert isinstance(loaded["weight"], torch.nn.Parameter) and loaded["weight"].requires_grad
        for key, value in state.items():
            assert torch.equal(loaded[key], value.detach()), (step, key)
        assert loaded["conj"].is_conj() and loaded["neg"].is_neg()
        assert loaded["rows"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
    assert weight.grad_fn is None and not base.requires_grad
    for name in ("a", "b"):  # other places in the same staging memory, which is part of no autograd graph
        async_ckpt.save(tmp_path / name, {"other": torch.arange(7.0)})[1].result()
        assert torch.equal(async_ckpt.load(tmp_path / name)["other"], torch.arange(7.0))


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


def test_a_large_save_of_many_tensors_is_written_by_the_threads_in_groups_and_loads_exact(tmp_path):
    generator = torch.Generator().manual_seed(0)
    sizes = [1 << 18] * 60 + [3 << 18] * 5 + [7, 1, 0]  # 75 MiB: the threads' path, in chunk groups
    state = {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}
    with make_async_checkpointer() as ckpt:
        ckpt.save(tmp_path / "ck", state)[1].result()
        assert_same(ckpt.load(tmp_path / "ck"), state)
    assert_same(torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True), state)


def test_chunk_groups_hold_every_chunk_once_in_about_equal_bytes():
    chunks = [
        Chunk(str(i), 0, 0, torch.empty(n, dtype=torch.uint8)) for i, n in enumerate([90, 50, 40, 30, 20, 10, 5, 5])
    ]
    groups = _balanced_groups(sorted(chunks, key=lambda c: -c.data.numel()), 3)
    assert sorted(c.key for g in groups for c in g) == sorted(c.key for c in chunks)
    totals = [sum(c.data.numel() for c in g) for g in groups]
    assert len(groups) == 3 and totals == sorted(totals, reverse=True) and totals[0] - totals[-1] <= 90


def test_map_location_moves_tensors_and_keeps_sharing(tmp_path, async_ckpt):
    weight = torch.randn(4, 4)
    async_ckpt.save(tmp_path / "ck", {"a": weight, "b": weight.t()})[1].result()
    moved = []

    def to_new_memory(storage, location):  # a relocation torch.load would apply: new storage, same bytes
        copy = torch.UntypedStorage(storage.nbytes())
        copy.copy_(storage)
        moved.append(copy.data_ptr())
        return copy

    loaded = async_ckpt.load(tmp_path / "ck", default_map_location=to_new_memory)
    assert len(moved) == 1 and loaded["a"].untyped_storage().data_ptr() == moved[0]  # rebuilt on the new storage
    assert loaded["b"].untyped_storage().data_ptr() == moved[0]  # and still shared by both views
    assert torch.equal(loaded["a"], weight) and torch.equal(loaded["b"], weight.t())


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
        assert torch.equal(
            loaded[name].reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)
        ), name


def test_callable_map_location_is_applied(tmp_path, async_ckpt):
    async_ckpt.save(tmp_path / "ck", {"a": torch.ones(2)})[1].result()
    seen = []
    loaded = async_ckpt.load(tmp_path / "ck", default_map_location=lambda storage, loc: seen.append(loc) or storage)
    assert seen == ["cpu"] and torch.equal(loaded["a"], torch.ones(2))


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_what_torch_save_round_trips_we_round_trip(tmp_path, async_ckpt, mode):
    z = torch.complex(torch.randn(5), torch.randn(5))
    other = torch.complex(torch.randn(5), torch.randn(5))
    tagged = torch.arange(3.0)
    tagged.note = "kept"  # a Python attribute, which torch.save keeps
    loss = (torch.ones(3, requires_grad=True) * 2).sum()  # part of an autograd graph
    state = {"conj": z.conj(), "neg": other.conj().imag, "plain": z, "tagged": tagged, "loss": loss}
    if mode == "async":
        async_ckpt.save(tmp_path / "ck", state)[1].result()
    else:
        with make_sync_checkpointer() as ckpt:
            ckpt.save(tmp_path / "ck", state)
    for loaded in (
        async_ckpt.load(tmp_path / "ck"),
        torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=False),
    ):
        assert torch.equal(loaded["conj"], z.conj()) and torch.equal(loaded["neg"], other.conj().imag)
        assert torch.equal(loaded["plain"], z) and loaded["tagged"].note == "kept"
        assert loaded["loss"].item() == 6.0 and loaded["loss"].requires_grad


def test_quantized_tensors_are_refused_with_the_reason(tmp_path, async_ckpt):
    quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    with pytest.raises(core.UnsupportedStateError, match="quantized"):
        async_ckpt.save(tmp_path / "ck", {"q": quantized})
    assert not (tmp_path / "ck").exists()


def test_empty_paths_are_refused(async_ckpt):
    with pytest.raises(ValueError, match="empty"):
        async_ckpt.save("", {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="empty"):
        async_ckpt.load("")


def test_zip_records_carry_real_crcs_and_the_final_name_as_their_folder(tmp_path, async_ckpt):
    import zipfile

    async_ckpt.save(tmp_path / "ck", {"w": torch.arange(10.0), "step": 3})[1].result()
    with zipfile.ZipFile(tmp_path / "ck" / "checkpoint_0.pt") as archive:
        names = archive.namelist()
        assert all(name.startswith("checkpoint_0/") for name in names), names
        for name in names:
            if "/data/" not in name:  # storage records carry CRC 0, as torch.save's compute_crc32=False writes them
                archive.read(name)  # checks the CRC


def test_the_first_load_prints_no_deprecation_warning(tmp_path, async_ckpt):
    import warnings

    async_ckpt.save(tmp_path / "ck", {"w": torch.ones(2), "h": torch.ones(2, dtype=torch.float16)})[1].result()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async_ckpt.load(tmp_path / "ck", weights_only=False)
        async_ckpt.load(tmp_path / "ck")


def test_legacy_torch_save_files_load(tmp_path, async_ckpt):
    torch.save({"w": torch.arange(4.0), "n": 2}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = async_ckpt.load(tmp_path / "legacy.pt")
    assert torch.equal(loaded["w"], torch.arange(4.0)) and loaded["n"] == 2
    partial = async_ckpt.load(tmp_path / "legacy.pt", {"w": torch.zeros(4)})
    assert torch.equal(partial["w"], torch.arange(4.0))


def _aligned_views(*sizes: int) -> tuple[mmap.mmap, list[memoryview]]:
    """Views of page-aligned memory (as staged storages are), each with distinct random bytes."""
    memory = mmap.mmap(-1, sum(round_up(max(size, 1)) for size in sizes))
    memory.write(os.urandom(len(memory)))
    views, start = [], 0
    for size in sizes:
        views.append(memoryview(memory)[start : start + size])
        start += round_up(max(size, 1))
    return memory, views


@pytest.mark.parametrize("use_direct_io", [True, False])
@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_a_whole_file_written_around_the_page_cache_holds_every_byte_in_order(tmp_path, use_direct_io, where):
    large = DIRECT_MIN_BYTES + 5  # the file is large enough to go around the page cache
    memory, (a, b, c, d, e) = _aligned_views(3 * PAGE_SIZE, 2 * PAGE_SIZE + 100, 50, PAGE_SIZE - 1, large)
    # records between storages end on page boundaries (as the zip layout's do) or not
    buffers = [b"head" * 1024, a, b"x" * (PAGE_SIZE - 100), b, b"y" * 7, c, d, b"", e, b"end of file"]
    folder = tmp_path if where == "tmp_path" else tempfile.mkdtemp(dir=where)
    path = os.path.join(folder, "whole")
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY)
        try:
            write_whole_file(fd, path, buffers, use_direct_io)
        finally:
            os.close(fd)
        with open(path, "rb") as f:
            assert f.read() == b"".join(bytes(buffer) for buffer in buffers)
    finally:
        if folder != tmp_path:
            shutil.rmtree(folder)
        for view in (a, b, c, d, e):
            view.release()
        memory.close()


def test_page_aligned_storages_go_to_the_device_from_where_they_are_and_the_rest_through_whole_pages():
    memory, (aligned, with_tail) = _aligned_views(2 * PAGE_SIZE, PAGE_SIZE + 10)
    segments = _segments(_plan([memoryview(b"r" * PAGE_SIZE), aligned, with_tail, memoryview(b"end")]))
    assert [len(s) for s in segments] == [PAGE_SIZE, 2 * PAGE_SIZE, PAGE_SIZE, PAGE_SIZE]
    assert segments[1].obj is aligned.obj and segments[2].obj is with_tail.obj  # not copied
    assert bytes(segments[3]) == bytes(with_tail[PAGE_SIZE:]) + b"end" + bytes(PAGE_SIZE - 13)
    segments.clear()
    # a buffer off a page boundary in memory (a live tensor's, say) is never sent from where it is
    assert [from_memory for from_memory, _ in _plan([aligned[1:], with_tail])] == [False]
    aligned.release()
    with_tail.release()
    memory.close()
