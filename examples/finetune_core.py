"""Fine-tune a small model with asynchronous checkpoints, then resume from the last one.

Copy this file to start: it builds a small transformer classifier, "pretrains" it briefly,
then fine-tunes it on a synthetic task, checkpointing every few steps. It runs twice, with
synchronous `torch.save` and with async-ckpt, and prints how long each checkpoint blocked
training and the total time. Finally it resumes from the last checkpoint and checks that the
restored state is exactly what was saved.

    python examples/finetune_core.py [--steps 60] [--every 10] [--width 512] [--out runs/core]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch
from torch import nn

from core import make_async_checkpointer


def build_model(width: int, layers: int = 4, classes: int = 4) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=width, nhead=8, dim_feedforward=2 * width, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, layers), nn.Flatten(), nn.LazyLinear(classes))


def make_data(width: int, n: int = 512, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq, width, generator=g)
    y = (x[:, 0, :4].argmax(dim=1)).long()  # a learnable rule
    return x, y


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}


def run(mode: str, args: argparse.Namespace) -> tuple[list[float], float, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(args.width)
    x, y = make_data(args.width)
    model(x[:2])  # materialise the lazy head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = os.path.join(args.out, mode)
    shutil.rmtree(out, ignore_errors=True)
    blocked: list[float] = []
    checkpointer = make_async_checkpointer() if mode == "async" else None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(x), (32,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            path = os.path.join(out, f"step_{step:06d}")
            t0 = time.perf_counter()
            if checkpointer is None:
                os.makedirs(path, exist_ok=True)
                torch.save(training_state(model, optimizer, step), os.path.join(path, "checkpoint_0.pt"))
            else:
                staged, _written = checkpointer.save(path, training_state(model, optimizer, step))
                staged.result()  # from here on training may change the model
            blocked.append(time.perf_counter() - t0)
    if checkpointer is not None:
        checkpointer.close()  # drains: every checkpoint is durable and committed
    total = time.perf_counter() - start
    return blocked, total, model, optimizer


def resume_and_check(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    out = os.path.join(args.out, "async")
    last = sorted(os.listdir(out))[-1]
    with make_async_checkpointer() as checkpointer:
        state = checkpointer.load(os.path.join(out, last))
    fresh = build_model(args.width)
    fresh(make_data(args.width, n=2)[0])
    fresh.load_state_dict(state["model"])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-4)
    fresh_optimizer.load_state_dict(state["optimizer"])
    same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    print(f"resumed from {last} (step {state['step']}): weights identical to the live model: {same}")
    if not same:
        raise SystemExit("resume check failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--out", default="runs/core")
    args = parser.parse_args()
    if args.steps % args.every:
        parser.error("--steps must be a multiple of --every so that the last step is checkpointed")
    results = {}
    for mode in ("sync", "async"):
        blocked, total, model, optimizer = run(mode, args)
        results[mode] = (blocked, total)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"model + optimizer: about {3 * nbytes / 1e6:.0f} MB per checkpoint, {len(results['sync'][0])} checkpoints")
    print(f"{'mode':<6} {'median block (ms)':>18} {'max block (ms)':>15} {'fit total (s)':>14}")
    for mode, (blocked, total) in results.items():
        print(f"{mode:<6} {1e3 * statistics.median(blocked):>18.1f} {1e3 * max(blocked):>15.1f} {total:>14.2f}")
    resume_and_check(args, model, optimizer)


if __name__ == "__main__":
    main()
