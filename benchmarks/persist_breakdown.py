"""Where a save's time goes, against the O_DIRECT floor, with and without a training loop running.

For the 1 GiB shape of bench.py (64 float32 tensors), --reps rounds, each of: the floor (an
O_DIRECT write + fsync of the same bytes from a warm buffer, on a thread of this process), then
one of our saves, both under the same condition: nothing else running, or the training loop
(StepLoop steps and an in-place change to the whole model) running until the write is done.
The disks of these machines drift by 2x within minutes, so each save is compared with the floor
measured just before it, and the ratio reported is the median of those pairs. Before each timed
write the files of the previous one are removed and the filesystem synced, so that neither
pays for freeing the other's blocks. Also: the core's
blocking time (snapshot copy and hand-over) and the writer's own steps (WriteResult.phases:
temporary file, zip skeleton, data writes with their checksums, manifest, fsync, pre-commit,
barrier, publish with commit.json, cleanup).

    python benchmarks/persist_breakdown.py            # --reps 7 --scale 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench

from core import CheckpointerConfig, CheckpointWriterConfig, make_async_checkpointer


class Condition:
    """Nothing else running (busy=False), or the training loop mutating the model until `done()`."""

    def __init__(self, model: torch.nn.Module, busy: bool) -> None:
        self.model = model
        self.busy = busy
        self.loop = bench.StepLoop()

    def run_until(self, done: Callable[[], bool]) -> None:
        while self.busy and not done():
            self.loop.step()
            bench.mutate(self.model)


def settle_disk(*paths: str) -> None:
    """Remove files and let the filesystem finish freeing them (this machine's ext4 is mounted
    with `discard`, so the next fsync would otherwise pay for trimming them)."""
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)
    os.sync()


def floor_seconds(floor: bench.PersistFloor, state: dict, path: str, condition: Condition) -> float:
    """One O_DIRECT write + fsync of the state's bytes to a new file, on a thread, under `condition`."""
    settle_disk(path)
    seconds: list[float] = []

    def write() -> None:
        start = time.perf_counter()
        floor.save(state, path)
        seconds.append(time.perf_counter() - start)

    thread = threading.Thread(target=write)
    thread.start()
    condition.run_until(lambda: not thread.is_alive())
    thread.join()
    return seconds[0]


def measure(state: dict, workdir: str, reps: int, condition: Condition) -> dict:
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file"))
    floor, floor_path = bench.PersistFloor(), os.path.join(workdir, "floor.bin")
    floor.save(state, floor_path)  # warm its buffer
    rows: list[dict] = []
    with make_async_checkpointer(config) as ckpt:
        for rep in range(reps + 1):
            floor_s = floor_seconds(floor, state, floor_path, condition)
            path = os.path.join(workdir, f"ck-{rep}")
            settle_disk(floor_path)
            start = time.perf_counter()
            staged, written = ckpt.save(path, state)
            staged.result()
            blocked = time.perf_counter() - start
            condition.run_until(written.done)
            result = written.result()
            durable = time.perf_counter() - start
            if rep > 0:  # the first save pays for fresh staging memory
                rows.append({"floor": floor_s, "x floor": durable / floor_s, "blocked": blocked, "durable": durable})
                rows[-1].update(result.phases)
            settle_disk(path)
    keys = sorted({k for row in rows for k in row})
    return {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="breakdown-", dir=os.path.dirname(os.path.abspath(__file__)))
    try:
        model, optimizer = bench.shape_1gib64(args.scale)
        state = bench.training_state(model, optimizer)
        print(f"{bench.nbytes_of(state) / 1e9:.2f} GB, medians of {args.reps} rounds")
        for busy in (False, True):
            medians = measure(state, workdir, args.reps, Condition(model, busy))
            label = "while training mutates the model" if busy else "nothing else running"
            print(
                f"\n{label}: durable after {medians['durable']:.3f} s, floor {medians['floor']:.3f} s; "
                f"{medians['x floor']:.2f}x the floor (median of the rounds' ratios)"
            )
            for key in sorted(medians, key=lambda k: -medians[k]):
                unit = "x" if key == "x floor" else "s"
                print(f"  {key:<22} {medians[key]:.3f} {unit}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
