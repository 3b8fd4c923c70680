"""One rank of the multi-rank tests: python tests/scripts/multi_rank_worker.py MODE SCENARIO OUT_DIR.

MODE is sync or async; RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the
launcher (tests/test_multi_rank.py). Each scenario asserts what every rank must see.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist

from core import (
    BarrierTimeoutError,
    CheckpointCommitError,
    CheckpointerConfig,
    CheckpointWriteError,
    CheckpointWriterConfig,
    UncommittedCheckpointError,
    WorldSizeMismatchError,
    find_latest,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from tests.helpers import FailingCommit, assert_same


def rank_state(rank: int, step: int) -> dict:
    """What rank `rank` saves at `step`: shared weights plus values of its own."""
    return {
        "model": {"w": torch.full((256,), float(step)), "b": torch.arange(8.0) + step},
        "rank": rank,
        "rng": torch.full((4,), rank * 100 + step, dtype=torch.int64),
        "step": step,
    }


def replicated_state(step: int) -> dict:
    """What every rank saves when the state is replicated, as with DDP."""
    return {"model": {"w": torch.full((256,), float(step))}, "optimizer": {"lr": 0.1}, "step": step}


def make(mode: str, timeout_secs: int, commit_hook=None):
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=timeout_secs))
    factory = make_async_checkpointer if mode == "async" else make_sync_checkpointer
    return factory(config, commit_hook=commit_hook)


def save(ckpt, path: str, state: dict, **kwargs) -> None:
    """Save and wait until committed; raises the save's error."""
    if hasattr(ckpt, "prepare"):
        ckpt.save(path, state, report_errors=False, **kwargs)[1].result()
    else:
        ckpt.save(path, state, **kwargs)


def expect_failure(action, error_type, *fragments: str) -> None:
    try:
        action()
    except error_type as exc:
        for fragment in fragments:
            assert fragment in str(exc), f"{fragment!r} not in: {exc}"
        return
    raise AssertionError(f"expected {error_type}")


def assert_uncommitted(ckpt, path: str) -> None:
    expect_failure(lambda: ckpt.load(path), UncommittedCheckpointError, "not committed")


def train(mode: str, out: str, rank: int, world: int) -> None:
    """Round trips, mismatched paths, a rank whose write fails, then a rank that crashes."""
    with make(mode, 60) as ckpt:
        for step in (0, 1):
            save(ckpt, f"{out}/step{step}", rank_state(rank, step), step=step)
        save(ckpt, f"{out}/replicated", replicated_state(5), step=5)
        dist.barrier()
        assert_same(ckpt.load(f"{out}/step1"), rank_state(rank, 1))
        partial = {"model": {"w": torch.zeros(256)}}
        ckpt.load(f"{out}/step1", partial)
        assert torch.equal(partial["model"]["w"], torch.full((256,), 1.0))

        path = f"{out}/mismatch_{'b' if rank == 1 else 'a'}"
        expect_failure(lambda: save(ckpt, path, rank_state(rank, 2)), CheckpointCommitError, "different paths")
        assert not os.path.exists(f"{path}/commit.json")

    with make(mode, 60, FailingCommit() if rank == 1 else None) as ckpt:
        if rank == 1:
            # the hook's RuntimeError itself (sync), or as the writer process reports it (async)
            expect_failure(
                lambda: save(ckpt, f"{out}/failed", rank_state(rank, 3)),
                (RuntimeError, CheckpointWriteError),
                "injected",
            )
        else:
            expect_failure(
                lambda: save(ckpt, f"{out}/failed", rank_state(rank, 3)),
                CheckpointCommitError,
                "rank(s) [1]",
                "injected",
            )
        assert_uncommitted(ckpt, f"{out}/failed")

    with make(mode, 8) as ckpt:
        save(ckpt, f"{out}/before_crash", rank_state(rank, 4))
        if rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        expect_failure(lambda: save(ckpt, f"{out}/crashed", rank_state(rank, 5)), BarrierTimeoutError)
        assert_uncommitted(ckpt, f"{out}/crashed")
        assert not [name for name in os.listdir(f"{out}/crashed") if name.startswith(f".checkpoint_{rank}.pt")]
        assert_same(ckpt.load(f"{out}/before_crash"), rank_state(rank, 4))
    print(f"rank {rank}: train scenario passed", flush=True)
    os._exit(0)  # the crashed rank left the process group unusable for a clean shutdown


def resume(mode: str, out: str, rank: int, world: int) -> None:
    """After a restart of every rank: each one restores its own state."""
    with make(mode, 60) as ckpt:
        assert_same(ckpt.load(f"{out}/step1"), rank_state(rank, 1))
        assert_same(ckpt.load(f"{out}/before_crash"), rank_state(rank, 4))
        assert_uncommitted(ckpt, f"{out}/crashed")


def reshape(mode: str, out: str, rank: int, world: int) -> None:
    """On fewer ranks than wrote it: replicated state just loads; per-rank state says what to do."""
    with make(mode, 60) as ckpt:
        assert_same(ckpt.load(f"{out}/replicated"), replicated_state(5))
        expect_failure(lambda: ckpt.load(f"{out}/step1"), WorldSizeMismatchError, "written by 4 ranks", "source_rank")
        assert_same(ckpt.load(f"{out}/step1", source_rank=3), rank_state(3, 1))


def per_node(mode: str, out: str, rank: int, world: int) -> None:
    """Each node's ranks see only their own node's disk at `out` (a tmpfs in a mount namespace)."""
    local = int(os.environ["LOCAL_RANK"])
    node_ranks = range(rank - local, rank - local + int(os.environ["LOCAL_WORLD_SIZE"]))
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(shared_filesystem=False))
    factory = make_async_checkpointer if mode == "async" else make_sync_checkpointer
    with factory(config) as ckpt:
        for step in (0, 1):
            save(ckpt, f"{out}/step{step}", rank_state(rank, step), step=step)
        dist.barrier()
        assert sorted(os.listdir(f"{out}/step1")) == sorted(
            [f"checkpoint_{r}.pt" for r in node_ranks] + ["commit.json"]
        )
        assert_same(ckpt.load(f"{out}/step1"), rank_state(rank, 1))
        assert find_latest(out) == f"{out}/step1", "this node's part of the checkpoint counts as complete"


def main() -> None:
    mode, scenario, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    scenarios = {"train": train, "resume": resume, "reshape": reshape, "per_node": per_node}
    scenarios[scenario](mode, out, dist.get_rank(), dist.get_world_size())
    print(f"rank {dist.get_rank()}: {scenario} scenario passed", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
