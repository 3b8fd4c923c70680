"""Two-process DDP (gloo, CPU) fit with AsyncCheckpointIO, then a resume on both ranks.

Then, after fit, trainer.save_checkpoint and trainer.test from that file on both ranks.
Run as: python tests/scripts/lightning_ddp_script.py OUT_DIR (Lightning relaunches it for rank 1).
"""

import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ckpt import AsyncCheckpointIO
from tests.lightning_helpers import EvaluatedClassifier, TinyClassifier, tiny_data, trainer


class CountingAsyncCheckpointIO(AsyncCheckpointIO):
    saves = 0

    def save_checkpoint(self, *args, **kwargs):
        CountingAsyncCheckpointIO.saves += 1
        super().save_checkpoint(*args, **kwargs)


class RecordAfterResume(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        torch.save(
            {"global_step": trainer.global_step, "state_dict": pl_module.state_dict()},
            os.path.join(self.out, f"resumed_rank{trainer.global_rank}.pt"),
        )


def main() -> None:
    out = sys.argv[1]
    ckpts = os.path.join(out, "ckpts")
    L.seed_everything(0)
    first = trainer(
        max_epochs=2,
        strategy="ddp",
        devices=2,
        plugins=[CountingAsyncCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=2)],
    )
    first.fit(TinyClassifier(), tiny_data())
    with open(os.path.join(out, f"saves_rank{first.global_rank}.txt"), "w") as f:
        f.write(str(CountingAsyncCheckpointIO.saves))
    second = trainer(
        max_epochs=3,
        strategy="ddp",
        devices=2,
        plugins=[AsyncCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=ckpts, save_last=True), RecordAfterResume(out)],
    )
    second.fit(TinyClassifier(), tiny_data(), ckpt_path=os.path.join(ckpts, "last.ckpt"))
    after_fit = os.path.join(out, "after_fit.ckpt")
    second.save_checkpoint(after_fit)  # then Lightning's barrier: rank 1 reads it right away
    tested = EvaluatedClassifier()
    second.test(tested, tiny_data(), ckpt_path=after_fit)
    torch.save(
        {"global_step": torch.load(after_fit, weights_only=True)["global_step"]},
        os.path.join(out, f"tested_rank{second.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
