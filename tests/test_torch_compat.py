"""What code written for torch.distributed.checkpoint._experimental relies on, and that no failure hangs."""

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from core import (
    AsyncCheckpointer,
    Barrier,
    BarrierConfig,
    BarrierTimeoutError,
    CheckpointerConfig,
    CheckpointProcess,
    CheckpointProcessConfig,
    CheckpointReader,
    CheckpointStager,
    CheckpointStagerConfig,
    CheckpointWriteError,
    CheckpointWriter,
    CheckpointWriterConfig,
    DefaultStager,
    DrainTimeoutError,
    RankInfo,
    TCPStoreBarrier,
    WriterProcessDiedError,
    WriterStartError,
    create_barrier_from_config,
    make_async_checkpointer,
    make_sync_checkpointer,
    register_barrier,
    wrap_future,
)
from tests.helpers import GatedCommit, free_port

ONE_RANK = RankInfo(global_rank=0, global_world_size=1)
STATE = {
    "model": {"w": torch.arange(6.0), "b": torch.ones(2)},
    "optimizer": {"param_groups": [{"lr": 0.01}]},
    "epoch": 5,
}


# -- writer-process side functions must be importable module-level functions


def upstream_writer_init_fn(**kwargs):
    return CheckpointWriter(config=kwargs.get("config"), rank_info=kwargs.get("rank_info"))


class MarkingWriter(CheckpointWriter):
    """A writer of torch's shape: overrides write(path, state_dict) and leaves a marker."""

    def write(self, path, state_dict, **kwargs):
        with open(os.fspath(path) + ".marker", "w") as f:
            f.write(f"{sorted(state_dict)} epoch={state_dict['epoch']} w={state_dict['model']['w'].tolist()}")
        return None


def marking_writer_init_fn(**kwargs):
    return MarkingWriter(config=kwargs.get("config"), rank_info=kwargs.get("rank_info"))


class SharedMemoryProbe(CheckpointWriter):
    def write(self, path, state_dict, **kwargs):
        assert state_dict["shared"].is_shared() and state_dict["regular"].is_shared()
        state_dict["shared"][0] = 42.0
        return None


def shared_memory_probe_init_fn(**kwargs):
    return SharedMemoryProbe(rank_info=kwargs.get("rank_info"))


def failing_writer_init_fn(**kwargs):
    raise RuntimeError("writer construction failed")


def slow_subprocess_init_fn(*args):
    time.sleep(30)


def _upstream_process(**overrides):
    """A CheckpointProcess built as torch's tests build theirs."""
    config = CheckpointProcessConfig(subprocess_init_timeout_secs=overrides.pop("timeout", 30))
    arguments = {
        "rank_info": ONE_RANK,
        "config": config,
        "subprocess_init_fn": _noop,
        "subprocess_init_args": (),
        "checkpoint_writer_init_fn": upstream_writer_init_fn,
        "checkpoint_writer_init_args": {"config": CheckpointWriterConfig(), "rank_info": ONE_RANK},
    }
    return CheckpointProcess(**{**arguments, **overrides})


def _noop(*args):
    pass


# -- the five defects of issue 12


def test_standalone_stager_never_needs_a_release():
    with DefaultStager(CheckpointStagerConfig(use_async_staging=False)) as stager:
        first = stager.stage({"a": torch.ones(4), "n": 1})
        second = stager.stage({"a": torch.zeros(4), "n": 2})  # same shape: reuses the buffer, as torch's does
        third = stager.stage({"b": torch.arange(1000.0)})  # another shape
        assert isinstance(first, dict) and isinstance(third, dict)
        assert second["n"] == 2 and torch.equal(second["a"], torch.zeros(4))
        assert torch.equal(third["b"], torch.arange(1000.0)) and dict(third).keys() == {"b"}


class FutureStager(CheckpointStager):
    """A custom stager of torch's shape: stage() returns a Future of a plain state dict."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1)

    def stage(self, state_dict, **kwargs):
        return self._pool.submit(
            lambda: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state_dict.items()}
        )

    def close(self):
        self._pool.shutdown()


def test_a_custom_stager_returning_a_future_works_with_async_checkpointer(tmp_path):
    checkpointer = AsyncCheckpointer(FutureStager(), _upstream_process(), CheckpointReader(ONE_RANK))
    try:
        stage, write = checkpointer.save(str(tmp_path / "ck"), {"w": torch.arange(3.0), "epoch": 2})
        assert stage.result(timeout=60) is None
        assert write.result(timeout=60).nbytes == 12
        assert checkpointer.load(str(tmp_path / "ck"))["epoch"] == 2
    finally:
        checkpointer.close()


def test_writer_init_args_may_name_rank_info(tmp_path):
    with make_async_checkpointer(
        rank_info=ONE_RANK,
        checkpoint_writer_init_fn=upstream_writer_init_fn,
        checkpoint_writer_init_args={"config": CheckpointWriterConfig(), "rank_info": RankInfo(0, 1)},
    ) as checkpointer:
        checkpointer.save(str(tmp_path / "ck"), STATE)[1].result(timeout=60)
        assert checkpointer.load(str(tmp_path / "ck"))["epoch"] == 5


def test_a_writer_that_overrides_write_is_called_with_the_state_dict(tmp_path):
    with make_async_checkpointer(
        rank_info=ONE_RANK, checkpoint_writer_init_fn=marking_writer_init_fn, checkpoint_writer_init_args={}
    ) as checkpointer:
        staged, written = checkpointer.save(str(tmp_path / "ck"), STATE)
        assert written.result(timeout=60) is None  # what that writer returned
    marker = (tmp_path / "ck.marker").read_text()
    assert marker == "['epoch', 'model', 'optimizer'] epoch=5 w=[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]"


@pytest.mark.parametrize("factory", [make_sync_checkpointer, make_async_checkpointer])
def test_strict_load_of_missing_keys_is_a_runtime_error(tmp_path, factory):
    with factory() as checkpointer:
        result = checkpointer.save(str(tmp_path / "ck"), {"model": {"w": torch.ones(2)}})
        if result is not None:
            result[1].result(timeout=60)
        with pytest.raises(RuntimeError, match="missing keys"):
            checkpointer.load(str(tmp_path / "ck"), {"model": {"w": torch.zeros(2)}, "missing_key": None}, strict=True)


# -- torch's public surface, with torch's names and behaviour


def test_sync_save_returns_none_and_stage_future_resolves_to_none(tmp_path):
    with make_sync_checkpointer() as sync:
        assert sync.save(str(tmp_path / "sync"), STATE) is None
        assert sync.stats.last.nbytes == 32
    with make_async_checkpointer() as checkpointer:
        stage, write = checkpointer.save(str(tmp_path / "async"), STATE)
        assert stage.result(timeout=60) is None
        assert write.result(timeout=60).nbytes == 32  # ours: a WriteResult where torch gives None


def test_wrap_future():
    assert wrap_future(5).result() is None
    source = Future()
    wrapped = wrap_future(source)
    source.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        wrapped.result()


def test_process_creation_future_and_process_handle():
    process = _upstream_process()
    try:
        assert process.process_creation_future.result(timeout=60) is None
        assert process.process.processes[0].is_alive()
    finally:
        process.close()
    assert not process.process.processes[0].is_alive()


def test_a_failing_init_function_is_a_runtime_error():
    process = _upstream_process(checkpoint_writer_init_fn=failing_writer_init_fn)
    try:
        with pytest.raises(RuntimeError, match="writer construction failed") as info:
            process.process_creation_future.result(timeout=60)
        assert isinstance(info.value, WriterStartError)
        with pytest.raises(RuntimeError, match="writer construction failed"):
            process.write({"w": torch.ones(1)}, "/unused")
    finally:
        process.close()


@pytest.mark.slow
def test_a_slow_start_is_a_timeout_error():
    process = _upstream_process(subprocess_init_fn=slow_subprocess_init_fn, timeout=1)
    try:
        with pytest.raises(TimeoutError, match="Timed out"):
            process.process_creation_future.result(timeout=60)
    finally:
        process.close()


def test_process_writes_plain_and_future_state_dicts_with_kwargs(tmp_path):
    process = _upstream_process()
    try:
        process.write(STATE, str(tmp_path / "plain"), custom_arg="x").result(timeout=60)
        pending = ThreadPoolExecutor(1)
        process.write(pending.submit(lambda: STATE), str(tmp_path / "future")).result(timeout=60)
        pending.shutdown()
        for name in ("plain", "future"):
            assert torch.load(tmp_path / name / "checkpoint_0.pt", weights_only=True)["epoch"] == 5
    finally:
        process.close()


def test_shared_memory_tensors_reach_the_writer_as_shared_memory(tmp_path):
    process = _upstream_process(checkpoint_writer_init_fn=shared_memory_probe_init_fn)
    shared, regular = torch.zeros(100).share_memory_(), torch.zeros(50)
    try:
        assert process.write({"shared": shared, "regular": regular}, str(tmp_path / "x")).result(timeout=60) is None
        assert shared[0].item() == 42.0  # the writer wrote into the very same memory
    finally:
        process.close()


def test_a_closed_channel_fails_writes_as_a_dead_child(tmp_path):
    process = _upstream_process()
    try:
        process.process_creation_future.result(timeout=60)
        process._parent_end.close()
        with pytest.raises(RuntimeError, match="Child process terminated unexpectedly"):
            process.write(STATE, str(tmp_path / "x")).result(timeout=60)
    finally:
        process.close()


def test_upstream_config_defaults():
    config = CheckpointProcessConfig()
    assert (config.subprocess_init_timeout_secs, config.subprocess_shutdown_timeout_secs) == (30, 60)
    assert CheckpointWriterConfig().write_barrier_timeout_secs == 600


def test_a_directory_torch_save_wrote_loads(tmp_path):
    (tmp_path / "ck").mkdir()
    torch.save(STATE, tmp_path / "ck" / "checkpoint_0.pt")
    with pytest.warns(UserWarning, match="extra"):  # ignored, as torch's reader ignores it, but not silently
        loaded, missing = CheckpointReader(ONE_RANK).read(str(tmp_path / "ck"), extra="ignored")
    assert loaded["epoch"] == 5 and missing == []
    partial, missing = CheckpointReader(ONE_RANK).read(str(tmp_path / "ck"), {"model": {"w": None}, "nope": None})
    assert torch.equal(partial["model"]["w"], torch.arange(6.0)) and missing == ["nope"]


class CountingBarrier(Barrier):
    """A barrier of torch's shape: only execute_barrier."""

    barrier_type = "counting"
    calls = 0

    def __init__(self):
        pass

    def execute_barrier(self):
        CountingBarrier.calls += 1


def test_register_barrier_the_torch_way_and_a_barrier_without_exchange(tmp_path):
    assert register_barrier(CountingBarrier) is CountingBarrier
    barrier = create_barrier_from_config(BarrierConfig(barrier_type="counting"))
    assert isinstance(barrier, CountingBarrier)
    writer = CheckpointWriter(CheckpointWriterConfig(), ONE_RANK, barrier=barrier)
    writer.write(str(tmp_path / "ck"), STATE)
    writer.close()
    assert CountingBarrier.calls == 1


def test_tcp_store_barrier_with_torchs_arguments_hosts_its_own_store():
    barrier = TCPStoreBarrier(
        global_rank=0,
        global_world_size=1,
        barrier_prefix="test",
        timeout_barrier_init_secs=30,
        use_checkpoint_barrier_tcpstore_libuv=False,
        tcpstore_port=free_port(),
        master_address="127.0.0.1",
        timeout_secs=30,
    )
    barrier.execute_barrier()
    barrier.execute_barrier()
    assert barrier.exchange({"a": 1}) == [{"a": 1}]


# -- no hang: every failure reaches the write future within seconds, and close() returns


class RaisingStager(CheckpointStager):
    def __init__(self, fail_in_future):
        self.fail_in_future = fail_in_future

    def stage(self, state_dict, **kwargs):
        if not self.fail_in_future:
            raise ValueError("stager failed")
        future = Future()
        threading.Timer(0.1, future.set_exception, (ValueError("stager future failed"),)).start()
        return future

    def close(self):
        pass


class RaisingProcess:
    config = CheckpointProcessConfig()

    def write(self, state_dict, path, **kwargs):
        raise OSError("the pipe broke")

    def close(self):
        pass


def _failed_quickly(write, error, match):
    with pytest.raises(error, match=match):
        write.result(timeout=30)


def test_a_failing_stager_fails_the_save_and_its_future(tmp_path):
    checkpointer = AsyncCheckpointer(RaisingStager(False), RaisingProcess(), CheckpointReader(ONE_RANK))
    with pytest.raises(ValueError, match="stager failed"):
        checkpointer.save(str(tmp_path / "x"), STATE)
    checkpointer.close()


def test_a_failing_stage_future_fails_the_write_future(tmp_path):
    checkpointer = AsyncCheckpointer(RaisingStager(True), RaisingProcess(), CheckpointReader(ONE_RANK))
    _, write = checkpointer.save(str(tmp_path / "x"), STATE)
    _failed_quickly(write, ValueError, "stager future failed")
    checkpointer.close()


def test_a_process_that_raises_fails_the_save_and_its_future(tmp_path):
    checkpointer = AsyncCheckpointer(DefaultStager(), RaisingProcess(), CheckpointReader(ONE_RANK))
    with pytest.raises(OSError, match="the pipe broke"):
        checkpointer.save(str(tmp_path / "x"), STATE)
    checkpointer.close()


@pytest.mark.slow
def test_a_dead_pipe_a_failing_writer_a_failing_hook_and_a_lonely_barrier_all_fail_their_futures(tmp_path, monkeypatch):
    process = _upstream_process()
    checkpointer = AsyncCheckpointer(DefaultStager(), process, CheckpointReader(ONE_RANK))
    try:
        process.process_creation_future.result(timeout=60)
        process._parent_end.close()
        _failed_quickly(checkpointer.save(str(tmp_path / "pipe"), STATE)[1], WriterProcessDiedError, "unexpectedly")
    finally:
        checkpointer.close()
    (tmp_path / "a_file").write_text("")
    with make_async_checkpointer() as checkpointer:  # the writer raises: a file where a folder must go
        _failed_quickly(
            checkpointer.save(str(tmp_path / "a_file" / "x"), STATE)[1], CheckpointWriteError, "Writer traceback"
        )
    from tests.helpers import FailingCommit

    with make_async_checkpointer(commit_hook=FailingCommit()) as checkpointer:
        _failed_quickly(checkpointer.save(str(tmp_path / "hook"), STATE)[1], CheckpointWriteError, "injected failure")
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # the job's store
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=2))
    with make_async_checkpointer(config, rank_info=RankInfo(0, 2)) as checkpointer:  # rank 1 never comes
        _failed_quickly(checkpointer.save(str(tmp_path / "alone"), STATE)[1], BarrierTimeoutError, "did not arrive")
    assert not (tmp_path / "alone" / "commit.json").exists()
    del store


def test_close_gives_up_after_the_drain_timeout_and_names_the_write(tmp_path):
    config = CheckpointerConfig(
        process_config=CheckpointProcessConfig(drain_timeout_secs=1, subprocess_shutdown_timeout_secs=1)
    )
    checkpointer = make_async_checkpointer(config, commit_hook=GatedCommit(tmp_path / "reached", tmp_path / "never"))
    _, write = checkpointer.save(str(tmp_path / "held"), STATE)
    with pytest.raises(DrainTimeoutError, match="held"):
        checkpointer.close()  # bounded: drain_timeout_secs, then the writer is stopped
    with pytest.raises(DrainTimeoutError):
        write.result(timeout=1)
    assert not (tmp_path / "held" / "commit.json").exists()
