"""Where a save's time goes, against the O_DIRECT floor, with and without a training loop running.

For the 1 GiB shape of bench.py (64 float32 tensors) it measures, as medians of --reps saves
after a first one: the floor (an O_DIRECT write + fsync of the same bytes from a warm buffer),
the core's blocking time (snapshot copy and hand-over), the time to durable and commit, and
the writer's own steps (WriteResult.phases: temporary file, zip skeleton, data writes with
their checksums, manifest, fsync, pre-commit, barrier, publish with commit.json, cleanup).

    python benchmarks/persist_breakdown.py            # --reps 5 --scale 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench

from core import CheckpointerConfig, CheckpointWriterConfig, make_async_checkpointer


def floor_seconds(state: dict, workdir: str) -> float:
    method = bench.PersistFloor()
    path = os.path.join(workdir, "floor.bin")
    method.save(state, path)  # warm the buffer
    times = []
    for _ in range(3):
        start = time.perf_counter()
        method.save(state, path)
        times.append(time.perf_counter() - start)
    os.unlink(path)
    return statistics.median(times)


def measure(state: dict, model: torch.nn.Module, workdir: str, reps: int, busy: bool) -> dict:
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file"))
    loop = bench.StepLoop()
    rows: list[dict] = []
    with make_async_checkpointer(config) as ckpt:
        for rep in range(reps + 1):
            path = os.path.join(workdir, f"ck-{rep}")
            start = time.perf_counter()
            staged, written = ckpt.save(path, state)
            staged.result()
            blocked = time.perf_counter() - start
            if busy:  # the training loop goes on mutating the model while the write runs
                while not written.done():
                    loop.step()
                    bench.mutate(model)
            result = written.result()
            durable = time.perf_counter() - start
            if rep > 0:
                rows.append({"blocked": blocked, "durable": durable, **result.phases})
            os.unlink(path)
    keys = sorted({k for row in rows for k in row})
    return {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="breakdown-", dir=os.path.dirname(os.path.abspath(__file__)))
    try:
        model, optimizer = bench.shape_1gib64(args.scale)
        state = bench.training_state(model, optimizer)
        floor = floor_seconds(state, workdir)
        print(f"{bench.nbytes_of(state) / 1e9:.2f} GB; floor (O_DIRECT write + fsync): {floor:.3f} s")
        for busy in (False, True):
            medians = measure(state, model, workdir, args.reps, busy)
            label = "while training mutates the model" if busy else "nothing else running"
            print(f"\n{label}: durable after {medians['durable']:.3f} s = {medians['durable'] / floor:.2f}x the floor")
            for key in sorted(medians, key=lambda k: -medians[k]):
                print(f"  {key:<22} {medians[key]:.3f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
