"""Sharded checkpoints: async-ckpt against DCP's save and async_save, side by side in one run.

Two ranks (gloo on 127.0.0.1) train an FSDP2 (`fully_shard`) model whose state (parameters and
AdamW's two moments) is `--mib` MiB per rank. Each round saves the same state once with every
method, in turn, into fresh folders; the medians over `--reps` rounds are reported:

  block    seconds until the training loop may change the state again (slowest rank)
  durable  seconds from the call until the checkpoint is committed on every rank
  load     seconds for ONE process (another world size) to load the whole checkpoint into a
           plain, unsharded model and optimizer state dict (page cache dropped first)

Methods: async-ckpt's sharded save; async-ckpt's save of each rank's local shards as plain
tensors (the rank-local save of the same bytes, which no other world size can load); DCP's
async_save; DCP's save.

    python benchmarks/sharded.py                  # 384 MiB per rank, 5 rounds
    python benchmarks/sharded.py --mib 96 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

METHODS = ("async-ckpt sharded", "async-ckpt rank-local (same bytes)", "DCP async_save", "DCP save")
WIDTH = 2048


def build(layers: int, sharded: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, WIDTH)).sum().backward()
    optimizer.step()
    return model, optimizer


def layers_for(mib: int, world: int) -> int:
    """Layers whose parameters and two AdamW moments come to `mib` MiB per rank."""
    return max(1, round(mib * 2**20 * world / (3 * 4 * WIDTH * WIDTH)))


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optimizer_state}


def local_tensors(state: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from core.torch_internals import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in flat.items()}


def slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def rank_main(out: str, mib: int, reps: int) -> None:
    import torch.distributed.checkpoint as dcp

    from core import make_async_checkpointer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer = build(layers_for(mib, world), sharded=True)
    state = state_of(model, optimizer)
    ckpt = make_async_checkpointer()
    ckpt.prepare(state).result()
    local = local_tensors(state)
    ckpt.save(f"{out}/warm_local", local)[1].result()  # both shapes' staging memory ready
    ckpt.save(f"{out}/warm_sharded", state)[1].result()
    times: dict[str, dict[str, list[float]]] = {m: {"block": [], "durable": []} for m in METHODS}

    def ours(path: str, value: Any) -> tuple[float, float]:
        start = time.perf_counter()
        staged, written = ckpt.save(path, value)
        staged.result()
        block = time.perf_counter() - start
        written.result()
        return block, time.perf_counter() - start

    def dcp_async(path: str, value: Any) -> tuple[float, float]:
        start = time.perf_counter()
        future = dcp.async_save(value, checkpoint_id=path)
        block = time.perf_counter() - start
        future.result()
        return block, time.perf_counter() - start

    def dcp_sync(path: str, value: Any) -> tuple[float, float]:
        start = time.perf_counter()
        dcp.save(value, checkpoint_id=path)
        seconds = time.perf_counter() - start
        return seconds, seconds

    runs = {
        METHODS[0]: lambda p: ours(p, state),
        METHODS[1]: lambda p: ours(p, local),
        METHODS[2]: lambda p: dcp_async(p, state),
        METHODS[3]: lambda p: dcp_sync(p, state),
    }
    for round_ in range(reps + 1):  # the first round warms DCP's staging and threads up: not counted
        for index, (method, run) in enumerate(runs.items()):
            path = f"{out}/r{round_}_{index}"
            dist.barrier()
            block, durable = run(path)
            block, durable = slowest(block), slowest(durable)
            if round_:
                times[method]["block"].append(block)
                times[method]["durable"].append(durable)
            dist.barrier()
            if rank == 0 and not (round_ == reps and index in (0, 3)):
                shutil.rmtree(path)  # the last round's sharded checkpoints are kept for the loads
            os.sync()
    ckpt.close()
    if rank == 0:
        with open(f"{out}/times.json", "w") as f:
            json.dump(
                {
                    "times": times,
                    "bytes_per_rank": sum(
                        t.numel() * t.element_size() for t in local.values() if isinstance(t, torch.Tensor)
                    ),
                },
                f,
            )
    dist.destroy_process_group()


def drop_cache(folder: str) -> None:
    os.sync()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def load_main(out: str, mib: int, reps: int) -> None:
    """One process loads both kept checkpoints (written by 2 ranks) into a plain state dict."""
    import torch.distributed.checkpoint as dcp

    from core import CheckpointReader

    model, optimizer = build(layers_for(mib, 2), sharded=False)
    state = state_of(model, optimizer)
    loads: dict[str, list[float]] = {"async-ckpt load": [], "DCP load": []}
    for _ in range(reps):
        for name, folder in (("async-ckpt load", f"{out}/r{reps}_0"), ("DCP load", f"{out}/r{reps}_3")):
            drop_cache(folder)
            start = time.perf_counter()
            if name == "DCP load":
                dcp.load(state, checkpoint_id=folder, no_dist=True)
            else:
                CheckpointReader().read(folder, state, strict=True)
            loads[name].append(time.perf_counter() - start)
    with open(f"{out}/loads.json", "w") as f:
        json.dump(loads, f)


def launch(out: str, mib: int, reps: int) -> None:
    port = 29500 + os.getpid() % 1000
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank-of", out, "--mib", str(mib), "--reps", str(reps)],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        )
        for r in range(2)
    ]
    if any(p.wait() for p in procs):
        raise SystemExit("a rank failed")
    subprocess.run([sys.executable, __file__, "--load-of", out, "--mib", str(mib), "--reps", str(reps)], check=True)


def report(out: str, mib: int, reps: int) -> str:
    with open(f"{out}/times.json") as f:
        saved = json.load(f)
    with open(f"{out}/loads.json") as f:
        loads = json.load(f)
    median = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in saved["times"].items()}
    local, dcp_async = median[METHODS[1]], median[METHODS[2]]
    lines = [
        f"Sharded checkpoints, 2 ranks x {saved['bytes_per_rank'] / 2**20:.0f} MiB (FSDP2, AdamW), medians of {reps} "
        f"rounds. Machine: {os.cpu_count()} CPUs, {platform.platform()}, torch {torch.__version__}.",
        "",
        "| method | block s | durable s | block / rank-local | durable / DCP async_save |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        m = median[method]
        lines.append(
            f"| {method} | {m['block']:.3f} | {m['durable']:.3f} | {m['block'] / local['block']:.2f} | "
            f"{m['durable'] / dcp_async['durable']:.2f} |"
        )
    ours, theirs = statistics.median(loads["async-ckpt load"]), statistics.median(loads["DCP load"])
    lines += [
        "",
        "| load of the 2-rank checkpoint into 1 process | s | / DCP load |",
        "| --- | --- | --- |",
        f"| async-ckpt (verified: every byte against its checksum) | {ours:.3f} | {ours / theirs:.2f} |",
        f"| DCP load | {theirs:.3f} | 1.00 |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=384, help="state per rank, MiB")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rank-of", help=argparse.SUPPRESS)
    parser.add_argument("--load-of", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sharded.txt"))
    args = parser.parse_args()
    if args.rank_of:
        return rank_main(args.rank_of, args.mib, args.reps)
    if args.load_of:
        return load_main(args.load_of, args.mib, args.reps)
    work = tempfile.mkdtemp(prefix="sharded-bench-", dir=os.path.join(ROOT, "benchmarks"))
    try:
        launch(work, args.mib, args.reps)
        text = report(work, args.mib, args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
