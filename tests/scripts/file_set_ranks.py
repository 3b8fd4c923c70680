"""Run on 2 ranks (tests.helpers.launch_ranks): rank 0's writer falls behind (held in its first
save) and cancels two saves that rank 1 has written already; every rank must then see those saves
cancelled, with nothing of either rank left, and the others published with both ranks' files."""

import os
import sys

import torch
import torch.distributed as dist

from accelerate_ckpt.file_set import FileSetCheckpointer, NamedState
from core import AsyncOptions
from tests.helpers import GatedCommit, wait_until


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")  # hosts the store the commit votes use
    rank = dist.get_rank()
    held = GatedCommit(os.path.join(out, "reached"), os.path.join(out, "gate")) if rank == 0 else None
    saver = FileSetCheckpointer(AsyncOptions().config(), held, rank, 2)
    futures = []
    for i in range(4):
        final = os.path.join(out, f"ckpt_{i}")
        os.makedirs(final, exist_ok=True)
        files = [NamedState(f"rank{rank}.bin", {"w": torch.full((4,), float(i)), "rank": rank})]
        staging = os.path.join(final, ".staging", f"rank{rank}")
        futures.append(saver.save(final, lambda _, files=files: files, staging=staging, publishes=True))
        if i == 0 and rank == 0:
            wait_until(lambda: os.path.exists(os.path.join(out, "reached")), what="rank 0's writer held")
    if rank == 0:
        try:
            asked = saver.cancel_all_but_newest(1)  # ckpt_0 too, but the writer is on it: written whole
            assert [final for final, _ in asked] == [os.path.join(out, f"ckpt_{i}") for i in range(3)], asked
            for _, received in asked:
                received.result(timeout=60)
        finally:
            dist.barrier()
            open(os.path.join(out, "gate"), "w").close()
    else:
        dist.barrier()
    cancelled = [f.result(timeout=120).cancelled for f in futures]
    assert cancelled == [False, True, True, False], cancelled
    dist.barrier()
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == ["ckpt_0", "ckpt_3"], os.listdir(out)
    for i in (0, 3):
        assert sorted(os.listdir(os.path.join(out, f"ckpt_{i}"))) == ["rank0.bin", "rank1.bin"]
    saver.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
