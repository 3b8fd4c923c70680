"""Frequent checkpoints: a training loop's total time with no checkpoints, with synchronous saves
and with async-ckpt, in one run, for small, medium and large states.

Part 1, a plain PyTorch loop (an MLP with AdamW; forward, backward and step on a small batch),
saving its whole state (model, optimizer, step) every step or every 10 steps:
- none: no checkpoints;
- torch.save: the framework's synchronous save (as Lightning's TorchCheckpointIO and Accelerate
  do: `torch.save` to the file, no fsync);
- async-ckpt: `AsyncCheckpointer.save`, one file. Two times: the loop's (until its last step
  returns, as for the others), and until every save is durable (the drain a job pays once, at
  its end; torch.save's files are not fsynced at all).
Every save goes to one `last.pt`, the pattern of every-step checkpointing (newest wins).

Part 2, Accelerate: a 1 MB model saved with `save_state()` every step (automatic naming, several
files per save), stock against the hook, with the time until every save is durable. With
`total_limit=3`, a save that falls out of the newest three before the writer reaches it is
skipped (pruning would delete it): the table says how many were written. Without a limit every
save is written and kept: the rate of durable saves is the writer's steady rate. One save_state
before the loop in both (the writer has started, as in a job whose first save comes after its
set-up). Without a limit, two floors run beside them: the same loop with about the least a
durable asynchronous save_state can cost (gather the same state, copy its tensors into shared
memory, pickle the RNG states; a bare writer process writes three files, fsyncs each, renames
their folder into place and fsyncs that), and that bare writer without any fsync. The first is
the bar for any durable asynchronous save; the second shows what durability itself costs.

Part 3, Lightning: the main job's fit (examples/finetune_lightning.py: a small transformer, about
40 MB with AdamW, 80 steps) checkpointed every step with `ModelCheckpoint(every_n_train_steps=1)`:
no checkpoints, Lightning's own synchronous saving and `AsyncCheckpointIO`, each fit's total time
(the plugin's fit ends when its last checkpoint is durable). The writer starts once, before the
fits, as in the example.

Rounds rotate the order of the methods; each number is the median over rounds. Tests check
behaviour; this measures.

    python benchmarks/every_step.py [--rounds 5] [--out benchmarks/results/every_step.txt]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SIZES = {"1 MB": 1 << 20, "40 MB": 40 << 20, "1 GiB": 1 << 30}
# Two to ten seconds of training each: on a shared 2-CPU VM a shorter loop's time swings by tens
# of percent from run to run, more than the differences measured.
STEPS = {"1 MB": 1000, "40 MB": 100, "1 GiB": 12}
BATCH = 16


def model_of(nbytes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Four square layers whose parameters and AdamW moments together hold about `nbytes`."""
    width = max(8, int((nbytes / 48) ** 0.5))
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step(model, optimizer)  # the optimizer's moments exist from here on
    return model, optimizer


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    width = model[0][0].in_features
    loss = model(torch.randn(BATCH, width)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": n}


def loop_time(size: str, every: int, method: str, folder: str) -> tuple[float, float]:
    """(seconds for STEPS[size] training steps with a save every `every` steps, seconds until
    every save is also durable)."""
    from core import CheckpointerConfig, CheckpointWriterConfig, make_async_checkpointer

    torch.manual_seed(0)
    model, optimizer = model_of(SIZES[size])
    path = os.path.join(folder, "last.pt")
    ckpt = None
    if method == "async-ckpt":
        ckpt = make_async_checkpointer(CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file")))
        ckpt.save(os.path.join(folder, "warm.pt"), {"x": torch.zeros(1)})[1].result()  # writer started
    start = time.perf_counter()
    for n in range(1, STEPS[size] + 1):
        step(model, optimizer)
        if n % every == 0 and method == "torch.save":
            torch.save(state_of(model, optimizer, n), path)
        elif n % every == 0 and ckpt is not None:
            ckpt.save(path, state_of(model, optimizer, n))
    loop = time.perf_counter() - start
    if ckpt is not None:
        ckpt.wait()
    durable = time.perf_counter() - start
    if ckpt is not None:
        ckpt.close()
    if method != "none":
        assert torch.load(path, weights_only=True)["step"] == STEPS[size] // every * every
    return loop, durable


ACCELERATE_SAVES = 100


def accelerate_loop(
    hook: bool, folder: str, saves: int = ACCELERATE_SAVES, total_limit: int | None = 3
) -> tuple[float, float, float, int]:
    """(loop seconds, seconds until every save is durable or skipped, median seconds of one
    save_state, how many of the saves were written) for `saves` steps, save_state each."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from accelerate_ckpt import enable_async_checkpointing

    config = ProjectConfiguration(project_dir=folder, automatic_checkpoint_naming=True, total_limit=total_limit)
    accelerator = Accelerator(cpu=True, project_config=config)
    torch.manual_seed(0)
    model, optimizer = accelerator.prepare(*model_of(SIZES["1 MB"]))
    handle = enable_async_checkpointing(accelerator, enabled=hook)
    accelerator.save_state()  # as in a job, whose first save comes after its set-up: the writer has started
    handle.wait()
    start = time.perf_counter()
    calls = []
    for _ in range(saves):
        step(model, optimizer)
        called = time.perf_counter()
        accelerator.save_state()
        calls.append(time.perf_counter() - called)
    loop = time.perf_counter() - start
    handle.close()  # waits for every pending save
    durable = time.perf_counter() - start
    written = handle.stats.saves - 1 if hook else saves  # (less the save before the loop)
    return loop, durable, statistics.median(calls), written


_FLOOR_WRITER = r"""
import mmap, os, sys
slab, nbytes, slots, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.nice(int(sys.argv[5]))
sync = os.fsync if sys.argv[6] == "durable" else (lambda fd: None)
view = memoryview(mmap.mmap(slab, nbytes * slots))
requests, acks = os.fdopen(0, "rb"), os.fdopen(1, "wb", buffering=0)  # (buffered: reads whole messages)
while header := requests.read(16):
    index, rng_size = int.from_bytes(header[:8], "little"), int.from_bytes(header[8:], "little")
    data = view[index % slots * nbytes :][:nbytes]
    files = {"model": data[: nbytes // 3], "optimizer": data[nbytes // 3 :], "rng": requests.read(rng_size)}
    staging = os.path.join(folder, f".staging_{index}")
    os.mkdir(staging)
    for name, content in files.items():
        fd = os.open(os.path.join(staging, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, content)
        sync(fd)
        os.close(fd)
    os.rename(staging, os.path.join(folder, f"checkpoint_{index}"))
    fd = os.open(folder, os.O_RDONLY)
    sync(fd)
    os.close(fd)
    acks.write(b"!")  # its slot may be reused
"""
_FLOOR_SLOTS = 64


def accelerate_floor_loop(
    folder: str, saves: int = ACCELERATE_SAVES, niceness: int | None = None, durable: bool = True
) -> tuple[float, float, float, int]:
    """accelerate_loop's numbers for about the least a durable asynchronous save_state can cost:
    gather what save_state gathers, copy the tensors into a free slot of shared memory and pickle
    the RNG states; a bare writer process (no plan, no file format, no checks, no vote) writes
    three files, fsyncs each, renames their folder into place and fsyncs that, at the writer's
    default priority, and frees the slot."""
    import mmap
    import pickle
    import subprocess

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from accelerate_ckpt.save_state import _rng_states
    from core import CheckpointProcessConfig

    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=folder))
    torch.manual_seed(0)
    model, optimizer = accelerator.prepare(*model_of(SIZES["1 MB"]))

    def tensors() -> list[torch.Tensor]:
        weights = accelerator.get_state_dict(model, unwrap=False)
        moments = [v for s in optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
        return [*weights.values(), *moments]

    nbytes = sum(t.nbytes for t in tensors())
    slab = os.memfd_create("floor")
    os.ftruncate(slab, nbytes * _FLOOR_SLOTS)
    memory = torch.frombuffer(mmap.mmap(slab, nbytes * _FLOOR_SLOTS), dtype=torch.uint8)
    memory.zero_()  # its pages exist before the loop (a slab pool's are made once, too)
    niceness = CheckpointProcessConfig().writer_niceness if niceness is None else niceness
    arguments = [str(slab), str(nbytes), str(_FLOOR_SLOTS), folder, str(niceness), "durable" if durable else "-"]
    command = [sys.executable, "-c", _FLOOR_WRITER, *arguments]
    writer = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(slab,))
    assert writer.stdin is not None and writer.stdout is not None
    done = 0  # saves the writer has finished, as far as the trainer has had to know
    start = time.perf_counter()
    calls = []
    for index in range(saves):
        step(model, optimizer)
        called = time.perf_counter()
        while done <= index - _FLOOR_SLOTS:  # the slot's last save is not written yet: wait for it
            done += len(os.read(writer.stdout.fileno(), _FLOOR_SLOTS))
        sources, places, offset = tensors(), [], index % _FLOOR_SLOTS * nbytes
        for t in sources:
            places.append(memory[offset : offset + t.nbytes].view(t.dtype).view(t.shape))
            offset += t.nbytes
        torch._foreach_copy_(places, sources)
        rng = pickle.dumps(_rng_states(accelerator))
        writer.stdin.write(index.to_bytes(8, "little") + len(rng).to_bytes(8, "little") + rng)
        writer.stdin.flush()
        calls.append(time.perf_counter() - called)
    loop = time.perf_counter() - start
    writer.stdin.close()
    writer.wait()
    durable = time.perf_counter() - start
    writer.stdout.close()
    os.close(slab)
    return loop, durable, statistics.median(calls), len(os.listdir(folder))


def _example() -> Any:
    """examples/finetune_lightning.py, the main job, as a module."""
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import finetune_lightning

    return finetune_lightning


def lightning_fit(mode: str, folder: str) -> tuple[float, float]:
    """(fit seconds, the same) of the example's fine-tuning in `mode` ("none", "sync", "async"),
    a checkpoint every step."""
    example = _example()
    args = argparse.Namespace(epochs=2, width=256, samples=1280, out=folder)
    shutil.rmtree(os.path.join(folder, f"{mode}_every_step"), ignore_errors=True)
    _, total = example.fine_tune(mode, args, args.epochs, None if mode == "none" else 1)
    os.sync()  # no fit pays for writing back another's checkpoints
    return total, total


def _in_new_folder(root: str, size: str, every: int, method: str) -> tuple[float, float]:
    folder = tempfile.mkdtemp(dir=root)
    try:
        return loop_time(size, every, method, folder)
    finally:
        shutil.rmtree(folder)
        os.sync()  # no method's saves pay for writing back or trimming another's


def rounds_of(
    run: Callable[[str], tuple[float, float]], methods: list[str], rounds: int
) -> dict[str, tuple[float, float]]:
    """Per method, the medians of (loop, durable) over `rounds`, the order rotating each round."""
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            times[m].append(run(m))
    return {m: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for m, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--out", default="benchmarks/results/every_step.txt")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="every_step-", dir=os.path.dirname(os.path.abspath(__file__)))
    lines = [
        f"Frequent checkpoints, medians of {args.rounds} rounds. Machine: {os.cpu_count()} CPUs, "
        f"{platform.platform()}, torch {torch.__version__}.",
        "",
        "Loop: until the last step returns. Durable: until every async-ckpt save is on disk (fsynced).",
        "",
        "| state | save every | steps | none s | torch.save s | async-ckpt loop s | async-ckpt durable s "
        "| torch.save / none | async loop / none | async loop / torch.save | async durable / torch.save |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    methods = ["none", "torch.save", "async-ckpt"]
    try:
        for size in args.sizes.split(","):
            for every in (1, 10):
                t = rounds_of(functools.partial(_in_new_folder, root, size, every), methods, args.rounds)
                none, sync, (loop, durable) = t["none"][0], t["torch.save"][0], t["async-ckpt"]
                lines.append(
                    f"| {size} | {'step' if every == 1 else f'{every} steps'} | {STEPS[size]} | {none:.2f} "
                    f"| {sync:.2f} | {loop:.2f} | {durable:.2f} | {sync / none:.2f} | {loop / none:.2f} "
                    f"| {loop / sync:.2f} | {durable / sync:.2f} |"
                )
                print(lines[-1], flush=True)
        lines += [
            "",
            f"Accelerate, 1 MB model, `save_state()` every step (automatic naming), {ACCELERATE_SAVES} steps, "
            f"medians of {ACCELERATE_ROUNDS_PER_ROUND * args.rounds} rounds:",
            "",
            "| save_state | total_limit | median call ms | loop s | async loop / stock | saves written "
            "| all durable s | written / s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for total_limit in (3, None):
            runs_of: dict[str, Callable[[str], tuple[float, float, float, int]]] = {
                "stock": functools.partial(accelerate_loop, False, total_limit=total_limit),
                "async-ckpt hook": functools.partial(accelerate_loop, True, total_limit=total_limit),
            }
            if total_limit is None:  # (the floors prune nothing)
                runs_of["floor: bare durable writer"] = accelerate_floor_loop
                runs_of["floor: bare writer, no fsync"] = functools.partial(accelerate_floor_loop, durable=False)
            lines += _accelerate_rows(root, runs_of, total_limit, ACCELERATE_ROUNDS_PER_ROUND * args.rounds)
        lines += _lightning_rows(root, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


ACCELERATE_ROUNDS_PER_ROUND = 3  # its loops are short, and vary the most


def _accelerate_rows(
    root: str,
    runs_of: dict[str, Callable[[str], tuple[float, float, float, int]]],
    total_limit: int | None,
    rounds: int,
) -> list[str]:
    """One table row per kind of run: medians over `rounds`, interleaved, the order rotating."""
    results: dict[str, list[tuple[float, float, float, int]]] = {label: [] for label in runs_of}
    labels = list(runs_of)
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            folder = tempfile.mkdtemp(dir=root)
            results[label].append(runs_of[label](folder))
            shutil.rmtree(folder)
            os.sync()
    stock_loop = statistics.median(run[0] for run in results["stock"])
    lines = []
    for label, runs in results.items():
        loop = statistics.median(run[0] for run in runs)
        durable = statistics.median(run[1] for run in runs)
        call = statistics.median(run[2] for run in runs)
        written = statistics.median(run[3] for run in runs)
        lines.append(
            f"| {label} | {total_limit or 'none'} | {1e3 * call:.1f} | {loop:.2f} | {loop / stock_loop:.2f} "
            f"| {written:.0f} | {durable:.2f} | {written / durable:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def _lightning_rows(root: str, rounds: int) -> list[str]:
    example = _example()
    example.start_writer()  # once, as a job's set-up would; every fit reuses it
    cache = os.path.join(root, "lightning")
    example.pretrained_model(256, os.path.join(cache, "pretrained"))  # made once, outside every fit
    t = rounds_of(functools.partial(lightning_fit, folder=cache), ["none", "sync", "async"], rounds)
    none, sync, async_ = t["none"][0], t["sync"][0], t["async"][0]
    lines = [
        "",
        "Lightning, the example's model (about 40 MB with AdamW), `ModelCheckpoint(every_n_train_steps=1)`, "
        "80 steps, fit total (async: until its last checkpoint is durable):",
        "",
        "| none s | Lightning sync s | async-ckpt s | sync / none | async / none | async / sync |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {none:.2f} | {sync:.2f} | {async_:.2f} | {sync / none:.2f} | {async_ / none:.2f} | {async_ / sync:.2f} |",
    ]
    print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
