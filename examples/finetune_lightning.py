"""Fine-tune a small transformer with Lightning and asynchronous checkpoints, then resume.

Copy this file to start. It builds a small transformer text classifier, "pretrains" it on a
synthetic language-modelling-like task, then fine-tunes it on a synthetic classification set,
with ``ModelCheckpoint(save_top_k=2, save_last=True)`` saving every few steps. The
fine-tuning runs without checkpoints, with Lightning's default (synchronous) checkpointing and
with ``AsyncCheckpointIO``, then once more each way checkpointing every training step
(``ModelCheckpoint(every_n_train_steps=1)``), and prints how long each checkpoint blocked
training and each fit's total time against the fit without checkpoints. The checkpoint writer
process starts once, before the fits, as in a job's set-up (its start is timed on its own line);
every fit reuses it. Finally it resumes from ``last`` with the async plugin and trains one more
epoch.

    python examples/finetune_lightning.py [--epochs 2] [--width 256] [--out runs/lightning]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core import make_async_checkpointer
from lightning_ckpt import AsyncCheckpointIO

VOCAB, SEQ, CLASSES = 1000, 32, 4


class TextClassifier(L.LightningModule):
    def __init__(self, width: int = 256, layers: int = 4, lr: float = 3e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=4 * width, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        loss = nn.functional.cross_entropy(self(tokens), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def make_dataset(n: int, seed: int) -> TensorDataset:
    """Token sequences whose class is which quarter of the vocabulary dominates them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    noise = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    signal = labels[:, None] * (VOCAB // CLASSES) + torch.randint(0, VOCAB // CLASSES, (n, SEQ), generator=g)
    tokens = torch.where(torch.rand(n, SEQ, generator=g) < 0.6, signal, noise)
    return TensorDataset(tokens, labels)


def pretrained_model(width: int, cache: str) -> TextClassifier:
    """A model "pretrained" once on a different split, cached on disk like downloaded weights."""
    path = os.path.join(cache, f"pretrained_w{width}.pt")
    model = TextClassifier(width)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    L.seed_everything(1)
    quick = L.Trainer(
        max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    quick.fit(model, DataLoader(make_dataset(640, seed=1), batch_size=32, shuffle=True))
    os.makedirs(cache, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


class Progress(L.Callback):
    """One line per epoch, so a slow machine shows where the run is."""

    def __init__(self, label: str, timer: Timed) -> None:
        self.label, self.timer, self.start = label, timer, time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(
            f"  [{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done after "
            f"{time.perf_counter() - self.start:.0f} s, {len(self.timer.blocked)} checkpoints so far",
            flush=True,
        )


class Timed:
    """Records how long each save_checkpoint call blocked the training loop."""

    def __init__(self) -> None:
        self.blocked: list[float] = []

    def wrap(self, plugin):
        original = plugin.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            start = time.perf_counter()
            original(*args, **kwargs)
            self.blocked.append(time.perf_counter() - start)

        plugin.save_checkpoint = save_checkpoint
        return plugin


def start_writer() -> float:
    """Start the checkpoint writer process now, as a job's set-up would, and return the seconds
    it took (a fresh interpreter importing torch). It waits for the plugins made afterwards; in a
    job whose set-up takes longer, `AsyncCheckpointIO()` alone, made early, hides this."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, make_async_checkpointer() as checkpointer:
        checkpointer.save(os.path.join(scratch, "ready"), {"ready": torch.zeros(1)})[1].result()
    return time.perf_counter() - start


def fine_tune(
    mode: str, args: argparse.Namespace, epochs: int, every: int | None, ckpt_path: str | None = None
) -> tuple[Timed, float]:
    """One fit: mode "none" (no checkpoints), "sync" or "async"; every=1: a checkpoint every step
    with ModelCheckpoint's defaults (keep the newest), else every `every` steps, top 2 and last."""
    L.seed_everything(0)
    model = pretrained_model(args.width, os.path.join(args.out, "pretrained"))
    timer = Timed()
    callbacks: list[L.Callback] = [Progress(mode, timer)]
    plugins = []
    if mode != "none":
        plugins.append(timer.wrap(AsyncCheckpointIO() if mode == "async" else TorchCheckpointIO()))
        directory = os.path.join(args.out, mode if every != 1 else f"{mode}_every_step")
        if every == 1:
            callbacks.append(ModelCheckpoint(dirpath=directory, every_n_train_steps=1))
        else:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=directory, save_top_k=2, save_last=True, monitor="train_loss", every_n_train_steps=every
                )
            )
    trainer = L.Trainer(
        max_epochs=epochs,
        plugins=plugins,
        callbacks=callbacks,
        enable_checkpointing=mode != "none",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(make_dataset(args.samples, seed=0), batch_size=32, shuffle=True)
    start = time.perf_counter()
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return timer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1280)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N training steps")
    parser.add_argument("--out", default="runs/lightning")
    parser.add_argument(
        "--no-every-step", dest="every_step", action="store_false", help="leave out the every-step rows"
    )
    args = parser.parse_args()
    for mode in ("sync", "async", "sync_every_step", "async_every_step"):
        shutil.rmtree(os.path.join(args.out, mode), ignore_errors=True)
    runs = [("none", None), ("sync", args.every), ("async", args.every)]
    if args.every_step:
        runs += [("sync", 1), ("async", 1)]
    print(
        f"Fine-tuning {len(runs)} times ({args.epochs} epochs each: no checkpoints, then synchronous and asynchronous "
        "checkpoints), then resuming: a few minutes on 2 idle CPU cores, longer on a busy machine. "
        "A line per epoch follows.",
        flush=True,
    )
    print(f"checkpoint writer process started in {start_writer():.1f} s (once per process; every fit reuses it)")
    results = [(mode, every, *fine_tune(mode, args, args.epochs, every)) for mode, every in runs]
    baseline = results[0][3]
    print("\ncheckpoint blocking time and fit time")
    print(
        f"{'checkpointing':<22} {'checkpoints':>11} {'median block (ms)':>18} {'max block (ms)':>15} "
        f"{'fit total (s)':>14} {'vs none':>8}"
    )
    for mode, every, timer, total in results:
        label = "none" if every is None else f"{mode}, every {'step' if every == 1 else f'{every} steps'}"
        median = f"{1e3 * statistics.median(timer.blocked):.1f}" if timer.blocked else "-"
        worst = f"{1e3 * max(timer.blocked):.1f}" if timer.blocked else "-"
        print(f"{label:<22} {len(timer.blocked):>11} {median:>18} {worst:>15} {total:>14.2f} {total / baseline:>7.2f}x")
    print("files:", sorted(os.listdir(os.path.join(args.out, "async"))))

    last = os.path.join(args.out, "async", "last.ckpt")
    step = torch.load(last, weights_only=True)["global_step"]
    _, total = fine_tune("async", args, args.epochs + 1, args.every, ckpt_path="last")
    print(f"resumed from last.ckpt (global step {step}) and trained one more epoch in {total:.2f} s")


if __name__ == "__main__":
    main()
