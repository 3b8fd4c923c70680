"""Incremental saves on a frozen-backbone fine-tune, against full async saves and torch.save.

A frozen backbone (most of the bytes) and a small trainable head with AdamW state; a few
training steps between saves. For each method, medians over the saves after the first:
blocking time, time until durable, bytes the snapshot copied and bytes the writer copied from
the previous file instead of writing them.

    python benchmarks/incremental.py                  # ~0.5 GiB backbone, 6 saves
    python benchmarks/incremental.py --backbone-mib 2048 --saves 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core import CheckpointerConfig, CheckpointStagerConfig, make_async_checkpointer


class FineTune(torch.nn.Module):
    """Frozen backbone of 1024-wide linear layers, trainable 2-layer head."""

    def __init__(self, backbone_mib: int) -> None:
        super().__init__()
        layers = max(1, backbone_mib * (1 << 20) // (1024 * 1024 * 4))
        self.backbone = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(layers)])
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))

    def train_steps(self, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
        for _ in range(steps):
            with torch.no_grad():
                features = self.backbone(torch.randn(16, 1024))
            self.head(features).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()


def run(method: str, backbone_mib: int, saves: int, root: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = FineTune(backbone_mib)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    model.train_steps(optimizer, 1)
    rows = []
    if method == "torch.save":
        for i in range(saves):
            model.train_steps(optimizer)
            path = os.path.join(root, f"{method}-{i}.pt")
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            elapsed = time.perf_counter() - start
            rows.append({"block": elapsed, "persist": elapsed, "copied": os.path.getsize(path), "reused": 0})
        return _medians(rows[1:])
    config = CheckpointerConfig(staging_config=CheckpointStagerConfig(incremental=method == "incremental"))
    with make_async_checkpointer(config) as ckpt:
        for i in range(saves):
            model.train_steps(optimizer)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            result = ckpt.save(os.path.join(root, f"{method}-{i}"), state)[1].result()
            rows.append(
                {
                    "block": result.blocking_seconds,
                    "persist": result.persist_seconds,
                    "copied": result.copied_nbytes,
                    "reused": result.reused_nbytes,
                }
            )
    return _medians(rows[1:])


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone-mib", type=int, default=512)
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory here)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "incremental.json"))
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-incremental-", dir=args.dir or os.path.dirname(os.path.abspath(__file__)))
    try:
        results = {
            method: run(method, args.backbone_mib, args.saves, root)
            for method in ("torch.save", "async full", "incremental")
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    full = results["async full"]
    lines = [
        f"frozen-backbone fine-tune, backbone {args.backbone_mib} MiB, medians of saves 2..{args.saves}, "
        f"{platform.node()} ({os.cpu_count()} CPUs)",
        f"{'method':<12} {'block s':>8} {'persist s':>10} {'copied MB':>10} {'reused MB':>10} "
        f"{'block vs full':>14} {'persist vs full':>16}",
    ]
    for method, r in results.items():
        lines.append(
            f"{method:<12} {r['block']:8.3f} {r['persist']:10.3f} {r['copied'] / 1e6:10.1f} "
            f"{r['reused'] / 1e6:10.1f} {r['block'] / full['block']:13.2f}x {r['persist'] / full['persist']:15.2f}x"
        )
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"backbone_mib": args.backbone_mib, "saves": args.saves, "results": results}, f, indent=1)
    with open(args.json.removesuffix(".json") + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
