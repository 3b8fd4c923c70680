"""Two-process Fabric DDP (gloo, CPU): every rank loads right after a save, as a resume loop does.

python tests/scripts/fabric_ddp_script.py OUT_DIR (Fabric relaunches it for rank 1). Rank 0's
writes are slowed down, so rank 1's loads come while they are still being written. Each rank
writes OUT/loaded_rank<r>.pt with the steps it read back, in order.
"""

import os
import sys

import lightning as L
import torch

from core import CheckpointNotFoundError
from lightning_ckpt import AsyncCheckpointIO
from tests.helpers import SlowCommit


def main() -> None:
    out = sys.argv[1]
    fabric = L.Fabric(
        accelerator="cpu", devices=2, strategy="ddp", plugins=[AsyncCheckpointIO(commit_hook=SlowCommit(0.5))]
    )
    fabric.launch()
    model = torch.nn.Linear(4, 2)
    path = os.path.join(out, "state.ckpt")
    seen = []
    for step in range(3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        fabric.save(path, {"model": model, "step": step})
        restored = torch.nn.Linear(4, 2)
        try:
            # "load if it exists, else start fresh": a rank that took the else branch would skip
            # Fabric's barrier below and the job would hang.
            remainder = fabric.load(path, {"model": restored})
        except (FileNotFoundError, CheckpointNotFoundError):
            seen.append(-1)
            continue
        fabric.barrier()
        assert torch.all(restored.weight == float(step)), (fabric.global_rank, step, restored.weight)
        seen.append(remainder["step"])
    torch.save(seen, os.path.join(out, f"loaded_rank{fabric.global_rank}.pt"))


if __name__ == "__main__":
    main()
