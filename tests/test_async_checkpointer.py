"""AsyncCheckpointer: the snapshot guarantee, buffer reuse, errors that are never lost, cleanup."""

import concurrent.futures
import os
import signal
import stat
import threading
import time
import weakref

import pytest
import torch

from core import (
    CheckpointerClosedError,
    CheckpointerConfig,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    CheckpointWriteError,
    CheckpointWriterConfig,
    UnsupportedStateError,
    WriterProcessDiedError,
    make_async_checkpointer,
    prestart_writer,
    release_idle_writers,
)
from core.fsutil import filesystem_clones, process_umask
from core.writer_pool import idle_writer_pids
from tests.helpers import (
    FailingCommit,
    GatedCommit,
    ListsFolderAtCommit,
    SlowCommit,
    assert_same,
    clone_tree,
    resident_bytes,
    rss_bytes,
    small_training_state,
    train_step,
    user_init,
    wait_until,
)


def test_snapshot_holds_values_at_save_time(tmp_path):
    model, optimizer = small_training_state()
    history = [1.0, 2.0]
    config = {"lr": 0.1, "schedule": history}
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config, "step": 7}
    expected = clone_tree(state)
    with make_async_checkpointer() as ckpt:
        staged, written = ckpt.save(tmp_path / "ck", state)
        staged.result()
        # Everything the caller passed changes right after the snapshot.
        for _ in range(3):
            train_step(model, optimizer)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1)
        history.append(3.0)
        config["lr"] = 99.0
        state["step"] = 8
        written.result()
        loaded = ckpt.load(tmp_path / "ck")
    assert_same(loaded, expected)


def test_slab_is_reused_across_saves_of_one_shape(tmp_path):
    model, optimizer = small_training_state()
    big = {"weights": torch.randn(8 << 20), "model": model.state_dict()}  # 32 MiB
    with make_async_checkpointer() as ckpt:
        for i in range(3):  # warm up: the first saves fault the slab in
            ckpt.save(tmp_path / f"warm{i}", big)[1].result()
        slabs_before = set(ckpt.stager.pool.slabs)
        rss_before = rss_bytes()
        for _ in range(20):
            big["weights"].add_(1)
            ckpt.save(tmp_path / "ck", big)[1].result()
        assert set(ckpt.stager.pool.slabs) == slabs_before, "a new staging slab was allocated"
        assert len(slabs_before) == 2  # max_in_flight's default: the slab and its spare, both faulted in
        growth = rss_bytes() - rss_before
        assert growth < big["weights"].nbytes, f"RSS grew by {growth} bytes over 20 saves"


def test_saves_in_flight_are_bounded_and_ordered(tmp_path):
    config = CheckpointerConfig(staging_config=CheckpointStagerConfig(max_in_flight=2, in_flight_bytes=0))
    value = torch.zeros(1 << 16)
    with make_async_checkpointer(config) as ckpt:
        futures = []
        for i in range(6):
            value.fill_(i)
            staged, written = ckpt.save(tmp_path / "same", {"v": value, "i": i})
            staged.result()
            futures.append(written)
        assert len(ckpt.stager.pool.slabs) <= 2
        ckpt.wait()
        assert all(f.done() and f.exception() is None for f in futures)
        loaded = ckpt.load(tmp_path / "same")
    assert loaded["i"] == 5 and torch.all(loaded["v"] == 5)


def test_unsupported_values_fail_at_save_before_writing(tmp_path):
    bad_values = {
        "lambda": lambda x: x,
        "open file": open(__file__),  # noqa: SIM115 - the value under test; closed in `finally`
        "meta tensor": torch.empty(3, device="meta"),
        "lock": threading.Lock(),
    }
    try:
        with make_async_checkpointer() as ckpt:
            for name, value in bad_values.items():
                with pytest.raises(UnsupportedStateError) as info:
                    ckpt.save(tmp_path / name, {"ok": torch.ones(1), "bad": value})
                assert "cannot checkpoint" in str(info.value)
                assert not (tmp_path / name).exists(), f"{name}: something was written"
            ckpt.save(tmp_path / "fine", {"ok": torch.ones(1)})[1].result()
    finally:
        bad_values["open file"].close()


def test_write_error_surfaces_on_future_or_once_on_next_save_wait_and_close(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")  # saving "under" a file fails in the writer, even for root
    ckpt = make_async_checkpointer()
    try:
        _, written = ckpt.save(blocked / "ck", {"w": torch.ones(3)})
        with pytest.raises(CheckpointWriteError) as info:
            written.result()
        assert "Writer traceback" in str(info.value)
        ckpt.save(tmp_path / "ok", {"w": torch.ones(3)})[1].result()  # seen on its future: not raised again

        _, unseen = ckpt.save(blocked / "unseen", {"w": torch.ones(3)})
        concurrent.futures.wait([unseen])
        with pytest.raises(CheckpointWriteError):  # nobody looked: raised, once, by the next save
            ckpt.save(tmp_path / "ok", {"w": torch.ones(3)})
        ckpt.save(tmp_path / "ok", {"w": torch.ones(3)})[1].result()  # and then saving works again

        ckpt.save(blocked / "again", {"w": torch.ones(3)})
        with pytest.raises(CheckpointWriteError):
            ckpt.wait()
        ckpt.wait()  # reported once

        ckpt.save(blocked / "third", {"w": torch.ones(3)})
        with pytest.raises(CheckpointWriteError):
            ckpt.close()
    finally:
        ckpt.close()
    assert not list(tmp_path.rglob("*.tmp"))


def test_killed_writer_fails_the_future_and_keeps_the_previous_checkpoint(tmp_path):
    with make_async_checkpointer(commit_hook=SlowCommit(120)) as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.zeros(4), "version": 1}, commit_delay=0)[1].result()
        pid = ckpt.writer_pid
        _, written = ckpt.save(tmp_path / "ck", {"w": torch.ones(1 << 20), "version": 2})  # its commit waits
        wait_until(lambda: list((tmp_path / "ck").glob(f".async-ckpt-*-{pid}-*.tmp/checkpoint_0.pt")), what="the write")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WriterProcessDiedError) as info:
            written.result(timeout=60)
        assert "SIGKILL" in str(info.value)
        previous = ckpt.load(tmp_path / "ck")
        assert previous["version"] == 1 and torch.equal(previous["w"], torch.zeros(4))
        assert sorted(os.listdir(tmp_path / "ck")) == ["checkpoint_0.pt", "commit.json"], "temporary files left behind"
        ckpt.save(tmp_path / "ck", {"w": torch.full((4,), 3.0), "version": 3}, commit_delay=0)[1].result()
        assert ckpt.writer_pid != pid  # a new writer
        assert ckpt.load(tmp_path / "ck")["version"] == 3


def test_close_is_idempotent_and_releases_everything(tmp_path):
    ckpt = make_async_checkpointer()
    ckpt.save(tmp_path / "ck", {"w": torch.ones(1 << 20)})
    pid = ckpt.writer_pid
    ckpt.close()
    ckpt.close()
    ckpt.wait()
    with pytest.raises(CheckpointerClosedError):
        ckpt.save(tmp_path / "again", {"w": torch.ones(1)})
    assert (tmp_path / "ck" / "checkpoint_0.pt").exists(), "close() did not drain the pending save"
    assert not any(name.startswith("memfd:async-ckpt") for name in _open_fd_targets())
    # The writer process waits, idle, for the next checkpointer of this process; releasing the
    # pool stops it.
    assert pid in idle_writer_pids()
    release_idle_writers()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_the_next_checkpointer_reuses_the_idle_writer_and_a_user_init_function_never_does(tmp_path):
    with make_async_checkpointer() as first:
        first.save(tmp_path / "a", {"w": torch.ones(4)})[1].result()
        pid = first.writer_pid
    with make_async_checkpointer() as second:
        assert second.writer_pid == pid, "the idle writer was not reused"
        assert second.save(tmp_path / "b", {"w": torch.ones(4)})[1].result().nbytes == 16
    with make_async_checkpointer(subprocess_init_fn=user_init) as third:
        assert third.writer_pid != pid, "a writer that ran a user's init function was reused"
        third.save(tmp_path / "c", {"w": torch.ones(4)})[1].result()


def _open_fd_targets() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return targets


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_every_writer_thread_runs_below_the_trainer_as_a_batch_task(tmp_path):
    config = CheckpointerConfig(process_config=CheckpointProcessConfig(writer_niceness=7))
    with make_async_checkpointer(config) as ckpt:
        ckpt.save(tmp_path / "a", {"w": torch.ones(4)})[1].result()
        threads = os.listdir(f"/proc/{ckpt.writer_pid}/task")
        trainer = os.getpriority(os.PRIO_PROCESS, 0)
        assert {os.sched_getscheduler(int(tid)) for tid in threads} == {os.SCHED_BATCH}
        assert {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in threads} == {min(trainer + 7, 19)}


def test_writer_does_not_rerun_the_main_module(tmp_path):
    """A training script without an `if __name__ == "__main__"` guard still works."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    marker = tmp_path / "runs.txt"
    script.write_text(
        "import torch\n"
        "from core import make_async_checkpointer\n"
        f"open({str(marker)!r}, 'a').write('run\\n')\n"
        "ckpt = make_async_checkpointer()\n"
        f"ckpt.save({str(tmp_path / 'ck')!r}, {{'w': torch.ones(2)}})\n"
        # no wait(): interpreter exit drains the pending save
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, cwd=os.getcwd())
    assert marker.read_text() == "run\n"
    assert torch.equal(torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)["w"], torch.ones(2))


def test_prepare_readies_the_slab_the_first_save_uses(tmp_path):
    state = {"w": torch.randn(1 << 20), "step": 1}
    one_slab = CheckpointerConfig(staging_config=CheckpointStagerConfig(max_in_flight=1))
    with make_async_checkpointer(one_slab) as ckpt:  # one slab: the first save must find the prepared one
        ckpt.prepare(state).result()
        prepared = set(ckpt.stager.pool.slabs)
        assert len(prepared) == 1
        ckpt.save(tmp_path / "ck", state)[1].result()
        assert set(ckpt.stager.pool.slabs) == prepared, "the first save allocated a new slab"
        assert torch.equal(ckpt.load(tmp_path / "ck")["w"], state["w"])


def test_two_checkpointers_saving_one_directory_each_commit_whole(tmp_path):
    with make_async_checkpointer() as first, make_async_checkpointer() as second:
        for round_ in range(20):
            a = first.save(tmp_path / "same", {"w": torch.full((1 << 14,), float(round_)), "by": "first"})[1]
            b = second.save(tmp_path / "same", {"w": torch.full((1 << 14,), float(round_)), "by": "second"})[1]
            for written in (a, b):
                written.result(timeout=60)  # both commit, one after the other: the last wins
            loaded = first.load(tmp_path / "same")  # committed, whole, from one of the two saves
            assert loaded["by"] in ("first", "second") and torch.all(loaded["w"] == round_)


def test_fresh_tensors_every_save_do_not_grow_memory(tmp_path):
    """The state dict is built from new tensors each save (as {k: v.cpu()} or .clone() do) and
    carries a changing step; no cache may keep earlier saves' tensors alive."""
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])  # 32 MiB of weights
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    saved_tensors = []
    with make_async_checkpointer() as ckpt:
        for step in range(3):
            ckpt.save(
                tmp_path / "warm", {"model": {k: v.clone() for k, v in model.state_dict().items()}, "step": step}
            )[1].result()
        before = resident_bytes()  # as the user sees it: a collection first would hide garbage cycles
        for step in range(20):
            state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "step": step}
            saved_tensors += [weakref.ref(tensor) for tensor in state["model"].values()]
            ckpt.save(tmp_path / "ck", state)[1].result()
            del state
            assert not [ref for ref in saved_tensors if ref() is not None], "a tensor outlived its save"
        growth = resident_bytes() - before
    # (The heap keeps some freed 4 MiB blocks resident, by how glibc places them: up to 1.6 saves'
    # worth was seen; a cache holding the saves would grow by 20.)
    assert growth < 3 * state_bytes, (
        f"RSS grew by {growth / 1e6:.1f} MB over 20 saves of fresh tensors (one save is 33.6 MB)"
    )


def test_prepare_after_close_is_a_clear_error():
    ckpt = make_async_checkpointer()
    ckpt.close()
    with pytest.raises(CheckpointerClosedError):
        ckpt.prepare({"w": torch.ones(4)})


def test_the_second_save_of_a_shape_finds_its_staging_memory_ready(tmp_path):
    config = CheckpointerConfig(staging_config=CheckpointStagerConfig(max_in_flight=2))
    gate = tmp_path / "gate"
    state = {"w": torch.randn(1 << 20)}
    with make_async_checkpointer(config, commit_hook=GatedCommit(tmp_path / "reached", gate)) as ckpt:
        ckpt.save(tmp_path / "first", state)  # held: the second save needs a second slab
        wait_until(lambda: len(ckpt.stager.pool.slabs) == 2, what="the spare slab, readied in the background")
        ready = set(ckpt.stager.pool.slabs)
        ckpt.save(tmp_path / "second", state)
        assert set(ckpt.stager.pool.slabs) == ready, "the second save allocated staging memory on the training thread"
        gate.touch()


def test_a_second_save_of_an_unchanged_state_under_the_same_key_writes_nothing(tmp_path):
    from core import CheckpointerConfig, CheckpointStagerConfig, CheckpointWriterConfig

    config = CheckpointerConfig(
        writer_config=CheckpointWriterConfig(layout="file"), staging_config=CheckpointStagerConfig(max_in_flight=2)
    )
    model, optimizer = small_training_state()

    def state(step):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}

    with make_async_checkpointer(config) as ckpt:
        expected = clone_tree(state(3))
        first = ckpt.save(tmp_path / "top.ckpt", state(3), dedupe_key=3)[1].result()
        second = ckpt.save(tmp_path / "last.ckpt", state(3), dedupe_key=3)[1].result()
        assert second.copied_nbytes == 0 and second.reused_nbytes == first.nbytes > 0
        if not filesystem_clones(str(tmp_path)):  # a hard link; where extents are shared, two files
            assert os.path.samefile(tmp_path / "top.ckpt", tmp_path / "last.ckpt")
        os.unlink(tmp_path / "top.ckpt")  # each name is a whole checkpoint on its own
        assert_same(torch.load(tmp_path / "last.ckpt", weights_only=True), expected)

        train_step(model, optimizer)  # changed in place under the same key: written, not linked
        changed = clone_tree(state(3))
        third = ckpt.save(tmp_path / "changed.ckpt", state(3), dedupe_key=3)[1].result()
        assert third.copied_nbytes > 0 and third.reused_nbytes == 0
        assert not os.path.samefile(tmp_path / "changed.ckpt", tmp_path / "last.ckpt")
        assert_same(torch.load(tmp_path / "changed.ckpt", weights_only=True), changed)
        other_values = ckpt.save(tmp_path / "step4.ckpt", state(4), dedupe_key=3)[1].result()  # another pickle
        assert other_values.copied_nbytes > 0
        assert torch.load(tmp_path / "step4.ckpt", weights_only=True)["step"] == 4

        os.unlink(tmp_path / "step4.ckpt")  # the file to link is gone: the snapshot's bytes are written
        again = ckpt.save(tmp_path / "again.ckpt", state(4), dedupe_key=3)[1].result()
        assert again.reused_nbytes == 0 and again.nbytes > 0
        assert torch.load(tmp_path / "again.ckpt", weights_only=True)["step"] == 4


def _held_writer(tmp_path, max_in_flight: int, in_flight_bytes: int = 0):
    """A checkpointer whose first save is held at its commit until `gate` exists (so later saves queue)."""
    config = CheckpointerConfig(
        writer_config=CheckpointWriterConfig(layout="file"),
        staging_config=CheckpointStagerConfig(max_in_flight=max_in_flight, in_flight_bytes=in_flight_bytes),
    )
    gate = tmp_path / "gate"
    ckpt = make_async_checkpointer(config, commit_hook=GatedCommit(tmp_path / "reached", gate))
    held = ckpt.save(tmp_path / "held.ckpt", {"w": torch.zeros(4)})[1]
    wait_until(lambda: (tmp_path / "reached").exists(), what="the held commit")
    return ckpt, gate, held


def test_queued_saves_of_one_path_that_a_newer_save_replaces_are_skipped(tmp_path):
    ckpt, gate, held = _held_writer(tmp_path, max_in_flight=5)
    with ckpt:
        writes = [ckpt.save(tmp_path / "last.ckpt", {"w": torch.full((4,), 1.0)})[1]]
        other = ckpt.save(tmp_path / "other.ckpt", {"w": torch.ones(4)})[1]  # (between them: not a newer one)
        writes += [ckpt.save(tmp_path / "last.ckpt", {"w": torch.full((4,), float(v))})[1] for v in (2, 3)]
        ckpt.cancel(tmp_path / "nothing.ckpt").result()  # the writer holds every save above now
        gate.touch()
        results = [w.result() for w in writes]
        assert [r.superseded for r in results] == [True, True, False], results
        assert not other.result().skipped and not held.result().skipped
        assert torch.equal(ckpt.load(tmp_path / "last.ckpt")["w"], torch.full((4,), 3.0))
        assert ckpt.stats.saves == 3  # the skipped ones are not counted as saves


def test_a_cancelled_save_that_was_not_started_is_not_written(tmp_path):
    ckpt, gate, held = _held_writer(tmp_path, max_in_flight=3)
    with ckpt:
        doomed = ckpt.save(tmp_path / "doomed.ckpt", {"w": torch.ones(4)})[1]
        kept = ckpt.save(tmp_path / "kept.ckpt", {"w": torch.ones(4)})[1]
        ckpt.cancel(tmp_path / "doomed.ckpt").result()
        ckpt.cancel(tmp_path / "held.ckpt").result()  # too late: it is being written, and finishes
        gate.touch()
        assert doomed.result().cancelled and not kept.result().skipped and not held.result().skipped
        assert sorted(os.listdir(tmp_path)) == ["gate", "held.ckpt", "kept.ckpt", "reached"]
    # The writer goes back to the process's pool holding the late cancel: the next checkpointer's
    # saves are its own and all written.
    with make_async_checkpointer() as after:
        saved = [after.save(tmp_path / f"after_{i}.ckpt", {"w": torch.ones(4)})[1] for i in range(3)]
        assert not any(w.result().skipped for w in saved)
    assert all((tmp_path / f"after_{i}.ckpt").exists() for i in range(3))


def test_a_cancelled_folder_is_skipped_whole_or_written_whole(tmp_path):
    """cancel(folder) names every pending write into it: none is written where the writer had
    taken up none of them, all are where it had begun (the files of one checkpoint are never
    left half written)."""
    config = CheckpointerConfig(
        writer_config=CheckpointWriterConfig(layout="file"), staging_config=CheckpointStagerConfig(max_in_flight=4)
    )
    begun, queued = tmp_path / "begun", tmp_path / "queued"
    begun.mkdir()
    queued.mkdir()
    with make_async_checkpointer(config, commit_hook=GatedCommit(tmp_path / "reached", tmp_path / "gate")) as ckpt:
        writes = [ckpt.save(begun / "a.ckpt", {"w": torch.ones(4)})[1]]
        wait_until(lambda: (tmp_path / "reached").exists(), what="the held commit")
        writes += [
            ckpt.save(path, {"w": torch.ones(4)})[1]
            for path in (begun / "b.ckpt", queued / "c.ckpt", queued / "d.ckpt")
        ]
        ckpt.cancel(begun).result()
        ckpt.cancel(queued).result()
        (tmp_path / "gate").touch()
        assert [w.result().cancelled for w in writes] == [False, False, True, True]
    assert sorted(os.listdir(begun)) == ["a.ckpt", "b.ckpt"] and os.listdir(queued) == []


def test_small_saves_beyond_max_in_flight_are_staged_within_the_byte_budget(tmp_path):
    ckpt, gate, held = _held_writer(tmp_path, max_in_flight=1, in_flight_bytes=1 << 20)
    with ckpt:
        # The first write holds the only slab max_in_flight allows; these stage into slabs of their
        # own (6 x 64 KiB within the 1 MiB budget) instead of waiting for it.
        for i in range(5):
            ckpt.save(tmp_path / f"small_{i}.ckpt", {"w": torch.full((1 << 14,), float(i))})[0].result()
        assert len(ckpt.stager.pool.slabs) == 6
        with pytest.raises(ValueError, match="in_flight_bytes"):
            CheckpointStagerConfig(in_flight_bytes=-1)
        gate.touch()
        ckpt.wait()
        assert not held.result().skipped
        assert len(ckpt.stager.pool.slabs) == 1, "the slabs lent for the burst were kept after their writes"
    for i in range(5):
        assert torch.equal(
            torch.load(tmp_path / f"small_{i}.ckpt", weights_only=True)["w"], torch.full((1 << 14,), float(i))
        )


def test_a_writer_started_ahead_of_time_serves_the_first_checkpointer(tmp_path):
    release_idle_writers()
    prestart_writer()
    prestart_writer()  # one is enough: a second call finds it waiting
    (started,) = idle_writer_pids()
    with make_async_checkpointer() as ckpt:
        ckpt.save(tmp_path / "ck", {"w": torch.ones(4)}, step=1)[1].result()
        assert ckpt.writer_pid == started and not idle_writer_pids()
    assert torch.equal(torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)["w"], torch.ones(4))


def _native_threads_without_python() -> set[int]:
    python = {thread.native_id for thread in threading.enumerate()}
    return {int(tid) for tid in os.listdir("/proc/self/task")} - python


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one intra-op thread: torch makes no OpenMP threads")
def test_no_torch_parallel_work_runs_on_a_helper_thread_of_ours(tmp_path):
    """Once a process has more OpenMP threads than CPUs, libgomp stops spin-waiting in the
    training thread's parallel regions for good: a parallel torch op on one of our threads (each
    gets an OpenMP team of its own) would slow every later training step."""
    torch.ones(1 << 22).add_(1)  # the main thread's team exists before counting
    before = _native_threads_without_python()
    state = {"w": torch.randn(16 << 20)}
    with make_async_checkpointer() as ckpt:
        ckpt.prepare(state).result()  # readies a slab on a helper thread
        for i in range(3):
            ckpt.save(tmp_path / f"ck{i}", state)[1].result()  # and a spare
        assert _native_threads_without_python() - before == set(), "an OpenMP team was made on a helper thread"


def test_saves_from_several_threads_each_land_in_the_order_they_were_made(tmp_path):
    # A save's request is sent by the caller itself when nothing is queued, else by the sender
    # thread (always, while the writer starts): either way requests leave in the order they were
    # made, so a file saved over and over (newer queued saves replacing older ones) ends with its
    # last save, never an older one. Saves start before the writer is up and go on after.
    def save_in_turn(ckpt, thread: int) -> None:
        for value in range(30):
            ckpt.save(tmp_path / f"thread{thread}.ckpt", {"w": torch.full((256,), float(value)), "step": value})
            time.sleep(0.02)

    release_idle_writers()
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file"))
    with make_async_checkpointer(config) as ckpt:
        threads = [threading.Thread(target=save_in_turn, args=(ckpt, t)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ckpt.wait()
    for t in range(4):
        loaded = torch.load(tmp_path / f"thread{t}.ckpt", weights_only=True)
        assert loaded["step"] == 29 and torch.equal(loaded["w"], torch.full((256,), 29.0)), t


def test_a_file_of_a_private_folder_is_written_in_place_and_removed_when_its_write_fails(tmp_path):
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file"))
    staging = tmp_path / "staging"
    staging.mkdir()
    state = {"w": torch.arange(6.0)}
    listing = tmp_path / "listing"
    with make_async_checkpointer(config, commit_hook=ListsFolderAtCommit(staging, listing)) as checkpointer:
        checkpointer.save(staging / "model.bin", state, private_folder=True)[1].result()
    assert listing.read_text() == "model.bin"  # written under its name, no temporary folder beside it
    assert os.listdir(staging) == ["model.bin"]
    assert torch.equal(torch.load(staging / "model.bin", weights_only=True)["w"], state["w"])
    assert stat.S_IMODE(os.stat(staging / "model.bin").st_mode) == 0o666 & ~process_umask()

    (staging / "other.bin").write_bytes(b"not ours")
    with make_async_checkpointer(config, commit_hook=FailingCommit()) as checkpointer:
        _, written = checkpointer.save(staging / "optimizer.bin", state, private_folder=True, report_errors=False)
        with pytest.raises(CheckpointWriteError, match="injected failure"):
            written.result()
        # a name that exists already is refused, and that file is left as it was
        _, clash = checkpointer.save(staging / "other.bin", state, private_folder=True, report_errors=False)
        with pytest.raises(CheckpointWriteError):
            clash.result()
    assert sorted(os.listdir(staging)) == ["model.bin", "other.bin"]
    assert (staging / "other.bin").read_bytes() == b"not ours"


def test_private_folder_writes_need_the_file_layout(tmp_path):
    with make_async_checkpointer() as checkpointer, pytest.raises(CheckpointWriteError, match='layout="file"'):
        checkpointer.save(tmp_path / "ck", {"w": torch.zeros(1)}, private_folder=True)[1].result()
