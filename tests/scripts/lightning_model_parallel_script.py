"""ModelParallelStrategy (FSDP2 over the data-parallel mesh, CPU, gloo) with AsyncCheckpointIO.

python tests/scripts/lightning_model_parallel_script.py OUT save DEVICES: fit 6 steps with sharded
checkpoints every 3 steps (and last), then keep the final state (rank 0: OUT/reference.pt). The
commits of step 3's checkpoints are held until training reaches step 5 (OUT/while_held.txt
records whether step 3's checkpoint was committed by then: it must not be).
python tests/scripts/lightning_model_parallel_script.py OUT resume DEVICES: resume from
OUT/ckpts/last.ckpt on DEVICES processes and keep the state the fit starts from (OUT/resumed.pt);
`stock_resume` does the same with Lightning's own checkpointing (no plugin).
Lightning relaunches the script for the other ranks.
"""

import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from lightning_ckpt import AsyncCheckpointIO
from tests.helpers import GatedCommit


class ShardedRegressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.ReLU(), torch.nn.Linear(33, 7))

    def configure_model(self) -> None:
        for layer in (self.net[0], self.net[2], self.net):
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data() -> torch.utils.data.DataLoader:
    inputs = torch.randn(64, 17, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=4)


def full_state(module: L.LightningModule) -> dict:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone() for k, v in get_model_state_dict(module, options=options).items()}


class OpenGate(Callback):
    """At step 5, note whether step 3's checkpoint is committed yet, then let the held commits go."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 5 and trainer.global_rank == 0:
            committed = os.path.exists(os.path.join(self.out, "ckpts", "epoch=0-step=3.ckpt", "commit.json"))
            with open(os.path.join(self.out, "while_held.txt"), "w") as f:
                f.write(str(committed))
            open(os.path.join(self.out, "gate"), "w").close()


class KeepStartingState(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        state = full_state(pl_module)
        if trainer.global_rank == 0:
            torch.save({"global_step": trainer.global_step, "model": state}, os.path.join(self.out, "resumed.pt"))


def trainer(out: str, devices: int, max_steps: int, callbacks: list, plugins: list) -> L.Trainer:
    return L.Trainer(
        default_root_dir=out,  # (a resumed fit's default ModelCheckpoint writes there, not into the cwd)
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        plugins=plugins,  # [AsyncCheckpointIO()]: the one line a user adds
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    out, phase, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ckpts = os.path.join(out, "ckpts")
    L.seed_everything(0)
    if phase == "save":
        every_3 = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=3, save_last=True, save_top_k=-1)
        held = AsyncCheckpointIO(commit_hook=GatedCommit(os.path.join(out, "reached"), os.path.join(out, "gate")))
        t = trainer(out, devices, 6, [every_3, OpenGate(out)], [held])
        module = ShardedRegressor()
        t.fit(module, data())
        state = full_state(module)
        if t.global_rank == 0:
            torch.save({"global_step": t.global_step, "model": state}, os.path.join(out, "reference.pt"))
    else:
        t = trainer(out, devices, 8, [KeepStartingState(out)], [] if phase == "stock_resume" else [AsyncCheckpointIO()])
        t.fit(ShardedRegressor(), data(), ckpt_path=os.path.join(ckpts, "last.ckpt"))


if __name__ == "__main__":
    main()
