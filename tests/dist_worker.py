"""One rank of the multi-process barrier test: python tests/dist_worker.py OUT_DIR MODE."""

import os
import sys

import torch
import torch.distributed as dist

from core import BarrierConfig, CheckpointerConfig, make_async_checkpointer, make_sync_checkpointer


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "async":
        barrier = BarrierConfig("tcp_store", {"global_rank": rank, "global_world_size": world, "timeout_secs": 60})
        checkpointer = make_async_checkpointer(CheckpointerConfig(barrier_config=barrier))
    else:
        checkpointer = make_sync_checkpointer(CheckpointerConfig(barrier_config=BarrierConfig("dist_barrier")))
    with checkpointer:
        for step in range(3):
            state = {"rank": rank, "w": torch.full((1000,), float(rank * 10 + step))}
            result = checkpointer.save(os.path.join(out, f"step{step}"), state)
            if mode == "async":
                result[1].result()
        dist.barrier()
        loaded = checkpointer.load(os.path.join(out, "step2"))
    assert loaded["rank"] == rank and torch.all(loaded["w"] == rank * 10 + 2), loaded
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
