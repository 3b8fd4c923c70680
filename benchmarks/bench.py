"""Checkpoint benchmark: floors, peers and async-ckpt side by side, in one process and one run.

For every method and state dict shape it measures, as medians over repetitions:
  block    seconds until the caller may mutate the state again (the training loop's cost)
  first    the same for the first save of a run (buffers not yet prepared)
  persist  seconds from the call until the checkpoint is durable (fsynced)
  load     seconds to load the checkpoint back (page cache dropped for the file first)
  mem      peak extra memory (PSS of this process and its children) over the baseline
  slowdown how much slower a compute-bound step loop runs while the write goes on
and prints a table with ratios to the floors and to the best peer, and writes JSON.

    python benchmarks/bench.py                       # both shapes, 3 repetitions
    python benchmarks/bench.py --shapes 1gib64 --reps 5 --scale 2 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ----------------------------------------------------------------------------- state dicts


def shape_1gib64(scale: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    numel = int((1 << 30) * scale) // 4 // 64
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(numel)) for _ in range(64)])
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def shape_transformer(scale: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = int(384 * scale**0.5) // 64 * 64
    layer = torch.nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=4 * width, batch_first=True)
    model = torch.nn.Sequential(torch.nn.Embedding(8192, width), torch.nn.TransformerEncoder(layer, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return model, optimizer


SHAPES = {"1gib64": shape_1gib64, "transformer": shape_transformer}


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1}


def tensors_of(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def nbytes_of(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(obj))


def mutate(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)


# ----------------------------------------------------------------------------- measuring helpers


def fsync_tree(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def drop_cache(path: str) -> None:
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _family(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        for task in os.listdir(f"/proc/{p}/task") if os.path.exists(f"/proc/{p}/task") else []:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return pids


class MemorySampler:
    """Peak PSS (bytes) of this process and its descendants while active."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        return 1024 * sum(_pss_kib(p) for p in _family(os.getpid()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self.baseline = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return max(self.peak - self.baseline, 0)


class StepLoop:
    """A compute-bound training-like step: a few matmuls."""

    def __init__(self) -> None:
        self.a = torch.randn(384, 384)
        self.b = torch.randn(384, 384)

    def step(self) -> float:
        start = time.perf_counter()
        x = self.a
        for _ in range(4):
            x = torch.tanh(x @ self.b)
        return time.perf_counter() - start

    def baseline(self, n: int = 60) -> float:
        return statistics.median(self.step() for _ in range(n))

    def while_running(self, done: Callable[[], bool], max_steps: int = 400) -> list[float]:
        times = []
        while not done() and len(times) < max_steps:
            times.append(self.step())
        return times


# ----------------------------------------------------------------------------- methods
# Each method: save(state, model, optimizer, path) -> done() callable; load(path, state) -> None.


class Method:
    name = ""
    kind = "ours"  # "floor", "peer" or "ours"
    asynchronous = True

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, workdir: str) -> None:
        self.model, self.optimizer, self.workdir = model, optimizer, workdir

    def save(self, state: dict, path: str) -> Callable[[], bool]:
        raise NotImplementedError

    def finish(self, path: str) -> None:
        """Called once done() is true: make the files durable if the method did not."""

    def load(self, path: str, state: dict) -> None:
        torch.load(path, weights_only=True, map_location="cpu")

    def close(self) -> None:
        pass


def _done_future(future: Future) -> Callable[[], bool]:
    return future.done


class SnapshotFloor(Method):
    name, kind, asynchronous = "floor: copy_ into preallocated", "floor", False

    def setup(self, model, optimizer, workdir):
        super().setup(model, optimizer, workdir)
        self.buffers = None

    def save(self, state, path):
        sources = tensors_of(state)
        if self.buffers is None:
            self.buffers = [torch.empty_like(t) for t in sources]
        torch._foreach_copy_(self.buffers, sources)
        return lambda: True


class PersistFloor(Method):
    name, kind, asynchronous = "floor: O_DIRECT write + fsync", "floor", False

    def save(self, state, path):
        nbytes = (nbytes_of(state) + 4095) // 4096 * 4096
        if not hasattr(self, "buffer") or len(self.buffer) != nbytes:
            self.buffer = mmap.mmap(-1, nbytes)
            torch.frombuffer(self.buffer, dtype=torch.uint8).fill_(1)  # every page backed, as real data
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
        view, chunk = memoryview(self.buffer), 64 << 20
        for start in range(0, nbytes, chunk):
            os.pwrite(fd, view[start : start + chunk], start)
        os.fsync(fd)
        os.close(fd)
        return lambda: True

    def load(self, path, state):
        nbytes = os.path.getsize(path)
        buffer = mmap.mmap(-1, nbytes)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        view, chunk = memoryview(buffer), 64 << 20
        for start in range(0, nbytes, chunk):
            os.preadv(fd, [view[start : start + chunk]], start)
        os.close(fd)


class TorchSave(Method):
    name, kind, asynchronous = "torch.save + fsync", "peer", False

    def save(self, state, path):
        torch.save(state, path)
        fsync_tree(path)
        return lambda: True


class LightningAsyncPeer(Method):
    name, kind = "Lightning AsyncCheckpointIO", "peer"

    def setup(self, model, optimizer, workdir):
        super().setup(model, optimizer, workdir)
        from lightning.fabric.plugins import TorchCheckpointIO
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        self.plugin = AsyncCheckpointIO(TorchCheckpointIO())

    def save(self, state, path):
        self.plugin.save_checkpoint(state, path)
        self.plugin._ensure_setup()
        marker = self.plugin._executor.submit(lambda: None)  # runs after the queued save
        return marker.done

    def finish(self, path):
        fsync_tree(path)

    def close(self):
        self.plugin.teardown()


class DCPAsync(Method):
    kind = "peer"

    def __init__(self, executor: str) -> None:
        self.executor = executor
        self.name = f"DCP async_save ({executor})"

    def save(self, state, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.THREAD if self.executor == "thread" else AsyncCheckpointerType.PROCESS
        response = dcp.async_save(state, checkpoint_id=path, async_checkpointer_type=kind)
        future = getattr(response, "upload_completion", response)
        return future.done

    def load(self, path, state):
        import torch.distributed.checkpoint as dcp

        dcp.load(state, checkpoint_id=path)


class AccelerateSaveState(Method):
    name, kind, asynchronous = "Accelerate save_state", "peer", False

    def setup(self, model, optimizer, workdir):
        super().setup(model, optimizer, workdir)
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=True)
        self.accelerator.prepare(model, optimizer)
        self.handle = None

    def save(self, state, path):
        self.accelerator.save_state(path, safe_serialization=False)
        fsync_tree(path)
        return lambda: True

    def load(self, path, state):
        self.accelerator.load_state(path)

    def close(self):
        self.accelerator._models.clear()
        self.accelerator._optimizers.clear()


class OursCore(Method):
    name = "async-ckpt core"

    def setup(self, model, optimizer, workdir):
        super().setup(model, optimizer, workdir)
        from core import CheckpointerConfig, CheckpointWriterConfig, make_async_checkpointer

        self.ckpt = make_async_checkpointer(CheckpointerConfig(writer_config=CheckpointWriterConfig(layout="file")))

    def save(self, state, path):
        staged, written = self.ckpt.save(path, state)
        staged.result()
        return written.done

    def load(self, path, state):
        self.ckpt.load(path)

    def close(self):
        self.ckpt.close()


class OursCorePrepared(OursCore):
    name = "async-ckpt core, prepare() first"

    def setup(self, model, optimizer, workdir):
        super().setup(model, optimizer, workdir)
        self.ckpt.prepare(training_state(model, optimizer)).result()


class OursLightning(Method):
    name = "async-ckpt Lightning plugin"

    def setup(self, model, optimizer, workdir):
        super().setup(model, optimizer, workdir)
        from lightning.fabric import Fabric

        from lightning_ckpt import AsyncCheckpointIO

        self.plugin = AsyncCheckpointIO()
        # Saves from a training loop: through Fabric (a direct call outside any loop is synchronous).
        self.fabric = Fabric(accelerator="cpu", devices=1, plugins=[self.plugin])

    def save(self, state, path):
        from core import pending_writes

        self.fabric.save(path, state)
        return lambda: not pending_writes(path)

    def load(self, path, state):
        self.plugin.load_checkpoint(path)

    def close(self):
        self.plugin.teardown()


class OursAccelerate(AccelerateSaveState):
    name, kind, asynchronous = "async-ckpt Accelerate hook", "ours", True

    def setup(self, model, optimizer, workdir):
        super().setup(model, optimizer, workdir)
        from accelerate_ckpt import enable_async_checkpointing

        self.handle = enable_async_checkpointing(self.accelerator, enabled=True)

    def save(self, state, path):
        from core import pending_writes

        self.accelerator.save_state(path, safe_serialization=False)
        return lambda: not pending_writes(path)

    def close(self):
        self.handle.close()
        super().close()


def all_methods() -> list[Method]:
    return [
        SnapshotFloor(),
        PersistFloor(),
        TorchSave(),
        LightningAsyncPeer(),
        DCPAsync("thread"),
        DCPAsync("process"),
        AccelerateSaveState(),
        OursCore(),
        OursCorePrepared(),
        OursLightning(),
        OursAccelerate(),
    ]


# ----------------------------------------------------------------------------- running


def run_method(
    method: Method, shape: str, scale: float, reps: int, workdir: str, loop: StepLoop, base_step: float
) -> dict:
    model, optimizer = SHAPES[shape](scale)
    state = training_state(model, optimizer)
    nbytes = nbytes_of(state)
    result: dict[str, Any] = {"method": method.name, "kind": method.kind, "shape": shape, "bytes": nbytes}
    try:
        gc.collect()
        before_setup = MemorySampler()._sample()
        method.setup(model, optimizer, workdir)
        blocks, persists, loads, slowdowns = [], [], [], []
        for rep in range(reps + 1):
            if rep == 1:
                # Memory in a save of its own (sampling page tables would distort the step timings),
                # counted from before the method set anything up: writer processes and buffers
                # included, and before any load has grown the heap.
                path = os.path.join(workdir, f"{shape}-memory")
                with MemorySampler() as memory:
                    memory.baseline = before_setup
                    done = method.save(state, path)
                    while not done():
                        time.sleep(0.002)
                    method.finish(path)
                _remove(path)
            path = os.path.join(workdir, f"{shape}-{rep}")
            gc.collect()
            start = time.perf_counter()
            done = method.save(state, path)
            block = time.perf_counter() - start
            mutate(model)
            steps = loop.while_running(done) if method.asynchronous else []
            while not done():
                time.sleep(0.002)
            method.finish(path)
            persists.append(time.perf_counter() - start)
            blocks.append(block)
            if len(steps) >= 3 and rep > 0:
                slowdowns.append(statistics.mean(steps) / base_step - 1)
            if rep > 0 and (method.kind != "floor" or isinstance(method, PersistFloor)):
                drop_cache(path)
                start = time.perf_counter()
                method.load(path, state)
                loads.append(time.perf_counter() - start)
            _remove(path)
        result.update(
            first=blocks[0],
            block=statistics.median(blocks[1:]),
            persist=statistics.median(persists[1:]),
            load=statistics.median(loads) if loads else None,
            mem=memory.extra,
            slowdown=statistics.median(slowdowns) if slowdowns else None,
        )
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            method.close()
        except Exception as exc:
            result.setdefault("error", f"close: {exc}")
    return result


def _remove(path: str) -> None:
    """Remove a checkpoint and let the filesystem finish freeing it (on a disk mounted with
    `discard`, the next save's fsync would otherwise pay for trimming it)."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    os.sync()


def partial_load(shape: str, scale: float, workdir: str) -> dict:
    """Our partial load of 10% of the tensors: bytes read against the file size."""
    from core import CheckpointReader, RankInfo, make_sync_checkpointer

    model, optimizer = SHAPES[shape](scale)
    state = {"model": model.state_dict()}
    path = os.path.join(workdir, "partial")
    with make_sync_checkpointer() as ckpt:
        ckpt.save(path, state)
    names = list(state["model"])[::10]
    target = {"model": {n: torch.empty_like(state["model"][n]) for n in names}}
    file = os.path.join(path, "checkpoint_0.pt")
    drop_cache(file)
    with open("/proc/self/io") as f:
        before = int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])
    CheckpointReader(RankInfo(0, 1)).read(path, target)
    with open("/proc/self/io") as f:
        read = int(dict(line.split(": ") for line in f.read().splitlines())["rchar"]) - before
    shutil.rmtree(path)
    return {
        "shape": shape,
        "tensors_requested": len(names),
        "tensors": len(state["model"]),
        "bytes_read": read,
        "file_bytes": os.path.getsize(file) if os.path.exists(file) else None,
        "read_fraction": read / max(1, sum(t.numel() * t.element_size() for t in state["model"].values())),
    }


def fmt(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:+.0f}%"
    if unit == "GB":
        return f"{value / 1e9:.2f}"
    return f"{value:.3f}"


def print_table(results: list[dict]) -> None:
    for shape in dict.fromkeys(r["shape"] for r in results):
        rows = [r for r in results if r["shape"] == shape]
        floor_block = next((r.get("block") for r in rows if r["method"].startswith("floor: copy_")), None)
        floor_persist = next((r.get("persist") for r in rows if r["method"].startswith("floor: O_DIRECT")), None)
        floor_load = next((r.get("load") for r in rows if r["method"].startswith("floor: O_DIRECT")), None)
        peers = [r for r in rows if r["kind"] == "peer" and "error" not in r]
        best_block = min((r["block"] for r in peers), default=None)
        best_persist = min((r["persist"] for r in peers), default=None)
        gb = rows[0]["bytes"] / 1e9
        print(f"\n{shape}: {gb:.2f} GB of tensors")
        header = (
            f"{'method':<32} {'block s':>8} {'first s':>8} {'persist s':>9} {'load s':>7} {'mem GB':>7} "
            f"{'slowdown':>9} {'block/floor':>11} {'persist/floor':>13} {'load floor/ours':>15} "
            f"{'block/best peer':>15} {'persist/best peer':>17}"
        )
        print(header)
        for r in rows:
            if "error" in r:
                print(f"{r['method']:<32} failed here: {r['error'][:120]}")
                continue
            ratio = lambda a, b: f"{a / b:.2f}x" if a is not None and b else "-"  # noqa: E731
            print(
                f"{r['method']:<32} {fmt(r['block']):>8} {fmt(r['first']):>8} {fmt(r['persist']):>9} "
                f"{fmt(r['load']):>7} {fmt(r['mem'], 'GB'):>7} {fmt(r['slowdown'], '%'):>9} "
                f"{ratio(r['block'], floor_block):>11} {ratio(r['persist'], floor_persist):>13} "
                f"{ratio(floor_load, r['load']):>15} {ratio(r['block'], best_block):>15} "
                f"{ratio(r['persist'], best_persist):>17}"
            )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1gib64,transformer")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the state dict sizes")
    parser.add_argument("--reps", type=int, default=3, help="repeated saves measured after the first one")
    parser.add_argument("--methods", default="", help="comma-separated substrings of method names to run")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder under the repo)")
    parser.add_argument("--json", default="benchmarks/results/latest.json")
    args = parser.parse_args()
    import torch.distributed as dist

    # DCP's process executor needs a process group; a single-rank gloo group on loopback.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    workdir = tempfile.mkdtemp(prefix="bench-", dir=args.dir or os.path.dirname(os.path.abspath(__file__)))
    loop = StepLoop()
    base_step = loop.baseline()
    methods = all_methods()
    if args.methods:
        methods = [m for m in methods if any(s in m.name for s in args.methods.split(","))]
    results = []
    try:
        for shape in args.shapes.split(","):
            for method in methods:
                print(f"running {method.name} on {shape} ...", file=sys.stderr, flush=True)
                results.append(run_method(method, shape, args.scale, args.reps, workdir, loop, base_step))
        partial = [partial_load(shape, args.scale, workdir) for shape in args.shapes.split(",")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "base_step_s": base_step,
    }
    print(f"machine: {machine}")
    print_table(results)
    for p in partial:
        print(
            f"partial load ({p['shape']}): {p['tensors_requested']} of {p['tensors']} tensors, "
            f"read {100 * p['read_fraction']:.1f}% of the tensor bytes"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {"machine": machine, "results": results, "partial_load": partial, "reps": args.reps, "scale": args.scale},
            f,
            indent=2,
        )
    print(f"wrote {args.json}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
