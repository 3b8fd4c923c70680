"""What the second save of one step costs: ModelCheckpoint's top-k file, then last.ckpt.

For the 1 GiB shape of bench.py, each round changes the model (as a training step would), saves
it as `top.ckpt`, then saves the same state again as `last.ckpt`: once with `dedupe_key=step`
(what the Lightning plugin passes) and once without. Medians of --reps rounds of the second
save's blocking time, time to durable and bytes written, against the first save's.

    python benchmarks/top_k_and_last.py            # --reps 5 --scale 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench

from core import CheckpointerConfig, CheckpointStagerConfig, CheckpointWriterConfig, make_async_checkpointer


def timed_save(ckpt, path: str, state: dict, **kwargs) -> dict:
    start = time.perf_counter()
    staged, written = ckpt.save(path, state, **kwargs)
    staged.result()
    blocked = time.perf_counter() - start
    result = written.result()
    return {
        "blocked": blocked,
        "durable": time.perf_counter() - start,
        "written_gb": (result.nbytes - result.reused_nbytes) / 1e9,
        "copied_gb": result.copied_nbytes / 1e9,
    }


def measure(model, optimizer, workdir: str, reps: int, dedupe: bool) -> dict[str, dict]:
    config = CheckpointerConfig(
        writer_config=CheckpointWriterConfig(layout="file"), staging_config=CheckpointStagerConfig(max_in_flight=2)
    )
    rows: dict[str, list[dict]] = {"top": [], "last": []}
    with make_async_checkpointer(config) as ckpt:
        for step in range(reps + 1):
            bench.mutate(model)
            state = {**bench.training_state(model, optimizer), "global_step": step}
            key = {"dedupe_key": step} if dedupe else {}
            top = timed_save(ckpt, os.path.join(workdir, f"top-{step}.ckpt"), state, **key)
            last = timed_save(ckpt, os.path.join(workdir, f"last-{step}.ckpt"), state, **key)
            if step > 0:  # the first round pays the staging memory's page faults
                rows["top"].append(top)
                rows["last"].append(last)
            for name in os.listdir(workdir):
                os.unlink(os.path.join(workdir, name))
    return {which: {k: statistics.median(r[k] for r in found) for k in found[0]} for which, found in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="top-k-last-", dir=os.path.dirname(os.path.abspath(__file__)))
    try:
        model, optimizer = bench.shape_1gib64(args.scale)
        print(f"{bench.nbytes_of(bench.training_state(model, optimizer)) / 1e9:.2f} GB, medians of {args.reps} rounds")
        print(f"{'':<28} {'block s':>8} {'durable s':>10} {'copied GB':>10} {'written GB':>11}")
        for dedupe in (True, False):
            medians = measure(model, optimizer, workdir, args.reps, dedupe)
            for which in ("top", "last"):
                m = medians[which]
                label = f"{which}.ckpt{', dedupe_key=step' if dedupe else ''}"
                print(
                    f"{label:<28} {m['blocked']:>8.3f} {m['durable']:>10.3f} "
                    f"{m['copied_gb']:>10.2f} {m['written_gb']:>11.2f}"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
