"""Train a sharded (FSDP2) model on 2 CPU processes with asynchronous checkpoints, resume on 1.

Copy this file to start. Phase 1 starts 2 processes (gloo on 127.0.0.1) that shard a small
transformer with `fully_shard`, train it with AdamW and save every few steps with
`ckpt.save(path, {"model": ..., "optim": ..., "step": ...})`: each rank snapshots and writes only
its own shards while training goes on. Phase 2 resumes the newest complete checkpoint in ONE
process, into a plain unsharded model, and trains on. The checkpoints are DCP's own format:
`torch.distributed.checkpoint.load` reads them too.

    python examples/finetune_sharded.py [--steps 12] [--every 4] [--width 128] [--out runs/sharded]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from core import find_latest, make_async_checkpointer

VOCAB, SEQ, CLASSES = 1000, 32, 4


class TextClassifier(nn.Module):
    def __init__(self, width: int, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=4 * width, batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden.mean(dim=1))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Made-up data: each rank its own batch, the same on every run."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, VOCAB, (8, SEQ), generator=generator)
    return tokens, tokens[:, 0] % CLASSES


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int) -> float:
    tokens, labels = batch(step, rank)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(tokens), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def build(width: int, sharded: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TextClassifier(width)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_sharded(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    model, optimizer = build(args.width, sharded=True)
    blocked = []
    with make_async_checkpointer() as ckpt:
        for step in range(1, args.steps + 1):
            loss = train_step(model, optimizer, step, rank)
            if step % args.every == 0:
                model_state, optimizer_state = get_state_dict(model, optimizer)
                start = time.perf_counter()
                ckpt.save(
                    os.path.join(args.out, f"step_{step:05d}"),
                    {"model": model_state, "optim": optimizer_state, "step": step},
                    step=step,
                )
                blocked.append(time.perf_counter() - start)  # training goes on while the shards are written
            if rank == 0:
                print(f"[2 ranks] step {step}: loss {loss:.4f}", flush=True)
    # (leaving the `with` waited for every write: the checkpoints are committed)
    if rank == 0:
        print(
            f"[2 ranks] {len(blocked)} sharded saves, median block {statistics.median(blocked) * 1e3:.1f} ms",
            flush=True,
        )
    dist.destroy_process_group()


def resume_on_one(args: argparse.Namespace) -> None:
    latest = find_latest(args.out)
    assert latest is not None, f"no complete checkpoint in {args.out}"
    model, optimizer = build(args.width, sharded=False)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state, "step": 0}
    with make_async_checkpointer() as ckpt:
        ckpt.load(latest, state, strict=True)  # reshards: 2 ranks' shards into one plain model
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    print(f"[1 process] resumed {os.path.basename(latest)} (step {state['step']})", flush=True)
    for step in range(state["step"] + 1, state["step"] + 3):
        print(f"[1 process] step {step}: loss {train_step(model, optimizer, step, 0):.4f}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--out", default="runs/sharded")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    mp.spawn(train_sharded, args=(2, free_port(), args), nprocs=2)
    resume_on_one(args)


if __name__ == "__main__":
    main()
