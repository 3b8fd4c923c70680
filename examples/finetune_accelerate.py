"""Fine-tune a small transformer with Accelerate and asynchronous save_state(), then resume.

Copy this file to start. The only lines async checkpointing adds are the import and
``enable_async_checkpointing(accelerator)``; ``accelerator.save_state()`` is unchanged. The
script saves every few steps and at each epoch end, drains at epoch end, resumes with
``load_state()``, and prints how long each save blocked training with the flag off and on.

    python examples/finetune_accelerate.py [--epochs 2] [--width 256] [--out runs/accelerate]
    ACCELERATE_ASYNC_CHECKPOINT=0 accelerate launch examples/finetune_accelerate.py --modes env
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accelerate_ckpt import enable_async_checkpointing

VOCAB, SEQ, CLASSES = 1000, 32, 4


class TextClassifier(nn.Module):
    def __init__(self, width: int, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=4 * width, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def make_dataset(n: int, seed: int) -> TensorDataset:
    """Token sequences whose class is which quarter of the vocabulary dominates them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    noise = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    signal = labels[:, None] * (VOCAB // CLASSES) + torch.randint(0, VOCAB // CLASSES, (n, SEQ), generator=g)
    return TensorDataset(torch.where(torch.rand(n, SEQ, generator=g) < 0.6, signal, noise), labels)


def fine_tune(
    enabled: bool | None, args: argparse.Namespace, project_dir: str, resume: bool = False
) -> tuple[list[float], float]:
    set_seed(0)
    accelerator = Accelerator(
        project_config=ProjectConfiguration(project_dir=project_dir, automatic_checkpoint_naming=True, total_limit=3)
    )
    handle = enable_async_checkpointing(accelerator, enabled=enabled)
    model = TextClassifier(args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=100)
    data = DataLoader(make_dataset(args.samples, seed=0), batch_size=32, shuffle=True)
    model, optimizer, scheduler, data = accelerator.prepare(model, optimizer, scheduler, data)
    if resume:
        accelerator.load_state()  # the newest complete checkpoint
        # Accelerate does not restore the naming counter: continue after the newest folder.
        folders = os.listdir(os.path.join(project_dir, "checkpoints"))
        accelerator.project_configuration.iteration = max(int(f.rsplit("_", 1)[1]) for f in folders) + 1

    blocked: list[float] = []

    def save() -> None:
        start = time.perf_counter()
        accelerator.save_state()
        blocked.append(time.perf_counter() - start)

    start = time.perf_counter()
    for _epoch in range(args.epochs):
        model.train()
        for step, (tokens, labels) in enumerate(data, 1):
            loss = nn.functional.cross_entropy(model(tokens), labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if step % args.every == 0:
                save()
        save()  # at each epoch end
        handle.wait()  # every checkpoint of this epoch is durable before the next epoch starts
    accelerator.end_training()  # drains too
    handle.close()
    return blocked, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1280)
    parser.add_argument("--every", type=int, default=10, help="save every N steps, and at each epoch end")
    parser.add_argument("--out", default="runs/accelerate")
    parser.add_argument("--modes", default="off,on", help="'off,on' compares both; 'env' follows the flag")
    args = parser.parse_args()
    modes = {"off": False, "on": True, "env": None}
    results = {}
    for mode in args.modes.split(","):
        project_dir = os.path.join(args.out, mode)
        shutil.rmtree(project_dir, ignore_errors=True)
        results[mode] = fine_tune(modes[mode], args, project_dir)
    print(f"\nsave_state() blocking time per save ({len(next(iter(results.values()))[0])} saves each)")
    print(f"{'async':<6} {'median block (ms)':>18} {'max block (ms)':>15} {'total (s)':>10}")
    for mode, (blocked, total) in results.items():
        print(f"{mode:<6} {1e3 * statistics.median(blocked):>18.1f} {1e3 * max(blocked):>15.1f} {total:>10.2f}")
    last_mode = list(results)[-1]
    project_dir = os.path.join(args.out, last_mode)
    print("checkpoints kept (total_limit=3):", sorted(os.listdir(os.path.join(project_dir, "checkpoints"))))
    _, total = fine_tune(modes[last_mode], argparse.Namespace(**{**vars(args), "epochs": 1}), project_dir, resume=True)
    print(f"resumed with load_state() from the newest checkpoint and trained one more epoch in {total:.2f} s")


if __name__ == "__main__":
    main()
