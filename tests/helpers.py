"""What the tests share: state dicts and comparisons, commit hooks, processes and paths."""

import collections
import contextlib
import ctypes
import dataclasses
import gc
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")

Point = collections.namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Box:
    size: int
    weights: torch.Tensor


def every_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    out = {
        "float32": base,
        "float64": base.double(),
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "complex64": torch.complex(base, base.flip(0)),
        "complex128": torch.complex(base, base).to(torch.complex128),
        "bool": base > 0,
        "int8": (base * 10).to(torch.int8),
        "uint8": (base * 10).to(torch.uint8),
        "int16": (base * 100).to(torch.int16),
        "int32": (base * 1000).to(torch.int32),
        "int64": (base * 1e6).to(torch.int64),
        "uint16": (base.abs() * 100).to(torch.uint16),
        "float8_e4m3fn": base.to(torch.float8_e4m3fn),
        "float8_e5m2": base.to(torch.float8_e5m2),
        "nan_payload": torch.tensor([0x7FC00001, 0x7F800001], dtype=torch.int32).view(torch.float32),
        "zero_dim": torch.tensor(3.5),
        "empty": torch.empty(0, 7),
        "non_contiguous": base.t(),
        "strided_slice": base[::2, 1:4],
    }
    return out


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def assert_same(a, b, path="root"):
    """Deep equality: same container types, bit-identical tensors."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert bit_equal(a, b), f"{path}: tensors differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def clone_tree(obj):
    if isinstance(obj, torch.Tensor):
        return (
            obj.detach().clone()
            if not isinstance(obj, torch.nn.Parameter)
            else torch.nn.Parameter(obj.detach().clone(), obj.requires_grad)
        )
    if isinstance(obj, dict):
        return type(obj)((k, clone_tree(v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(clone_tree(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: clone_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def small_training_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def train_step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(5, 8)).pow(2).mean().backward()
    optimizer.step()


class SlowCommit:
    """A picklable WriterHook that makes every commit take `seconds` longer (a save's
    `commit_delay=...` keyword overrides that for the save)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def pre_commit(self, path, **kwargs):
        time.sleep(kwargs.get("commit_delay", self.seconds))

    def post_commit(self, path, **kwargs):
        pass


class GatedCommit:
    """A picklable WriterHook that holds each commit until a test says so: pre_commit creates
    `reached` (the file is written and fsynced by then) and waits until `gate` exists. With a
    `log`, it first appends the path of the file to it (a line each): what the writer wrote."""

    def __init__(self, reached, gate, log=None) -> None:
        self.reached, self.gate = str(reached), str(gate)
        self.log = None if log is None else str(log)

    def pre_commit(self, path, **kwargs):
        if self.log is not None:
            with open(self.log, "a") as log:
                log.write(f"{path}\n")
        open(self.reached, "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.01)

    def post_commit(self, path, **kwargs):
        pass


class FailingCommit:
    """A picklable WriterHook whose pre_commit fails, as a rank's broken write or an upload would."""

    def pre_commit(self, path, **kwargs):
        raise RuntimeError("injected failure before commit")

    def post_commit(self, path, **kwargs):
        pass


class ListsFolderAtCommit:
    """A picklable WriterHook that records, in the file `record`, what `folder` holds when a
    write reaches its pre_commit (its file written, not yet published)."""

    def __init__(self, folder, record) -> None:
        self.folder, self.record = str(folder), str(record)

    def pre_commit(self, path, **kwargs):
        with open(self.record, "w") as f:
            f.write("\n".join(sorted(os.listdir(self.folder))))

    def post_commit(self, path, **kwargs):
        pass


class DiesBeforeCommit:
    """A picklable WriterHook that SIGKILLs the process it runs in (the writer) once the file of
    the save with metadata `step` is durable, before its commit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def pre_commit(self, path, **kwargs):
        if kwargs.get("step") == self.step:
            os.kill(os.getpid(), 9)

    def post_commit(self, path, **kwargs):
        pass


def flip_byte(path, record: str, at: int = 0) -> None:
    """Invert one byte of a checkpoint file, `at` bytes into its zip record `record` (e.g. "data/0")."""
    offset = torch._C.PyTorchFileReader(str(path)).get_record_offset(record) + at
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes() -> int:
    """Resident memory, after handing freed heap memory back to the system (so that only memory
    still in use counts, not what the allocator keeps for later)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """Resident memory as a user sees it: no garbage collection, no trimming of the heap first."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def script_env(**extra: str) -> dict:
    """The environment of a test's subprocess: this repository importable, plus `extra`."""
    return {**os.environ, "PYTHONPATH": REPO, **extra}


def start_scenario(scenario: str, out, own_session: bool = False) -> subprocess.Popen:
    """Start tests/scripts/fault_scripts.py SCENARIO OUT (text output); in a session of its own
    when the test kills it together with its writer (os.killpg)."""
    return subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "fault_scripts.py"), scenario, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(PYTHONFAULTHANDLER="1"),  # a stuck scenario shows its threads' stacks (finish_scenario)
        start_new_session=own_session,
    )


def finish_scenario(trainer: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """The scenario's (stdout, stderr) once it exits; if it has not within `timeout`, fail with
    every thread's stack (SIGABRT, which the fault handler answers with them)."""
    try:
        return trainer.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        trainer.send_signal(signal.SIGABRT)
        out, errors = trainer.communicate()
        stacks = f"its threads:\n{errors[-8000:]}\n{out[-2000:]}"
        raise AssertionError(f"the scenario did not finish within {timeout} s; {stacks}") from None


def crash_at_the_held_commit(out) -> None:
    """Run the crash_before_commit scenario in OUT and SIGKILL its trainer and writer together once
    step_3's file is written and its commit held (step_1 and step_2 are committed)."""
    trainer = start_scenario("crash_before_commit", out, own_session=True)
    assert trainer.stdout.readline().startswith("pending"), trainer.stderr.read()
    wait_until(lambda: (out / "reached").exists(), what="the held commit")  # the file is written and fsynced
    kill_together(trainer)


def kill_together(trainer: subprocess.Popen) -> None:
    """SIGKILL a scenario started with own_session=True and its writer; return once both are dead.
    (SIGKILL lands when a process leaves the kernel: a writer inside an fsync dies after it returns.)"""
    os.killpg(trainer.pid, 9)
    trainer.wait()
    wait_until(lambda: not live_members_of_group(trainer.pid), timeout=600, what="the killed writer to die")


def live_members_of_group(pgid: int) -> list[int]:
    """The processes of process group `pgid` that still run (zombies have finished)."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            live.append(int(entry))
    return live


@contextlib.contextmanager
def small_tmpfs(folder, size: str):
    """A tmpfs of `size` mounted on a new folder in `folder` (skips the test where it cannot be)."""
    mount_point = folder / "small"
    mount_point.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True
    )
    if not mounted or mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def launch_ranks(world: int, argv: list[str], timeout: float = 240, nodes: int = 1, node_disk=None) -> list[int]:
    """Run the script `argv` (path and arguments) on `world` ranks spread over `nodes`, as torchrun
    would; returns the exit codes, one per rank (one per node when nodes > 1). With several nodes
    each one runs in a mount namespace of its own with a private tmpfs at `node_disk`: a machine
    with its own local disk."""
    port = free_port()
    per_node = world // nodes
    procs = []
    for node in range(nodes):
        commands = []
        for local in range(per_node):
            rank = node * per_node + local
            env = {
                "RANK": rank,
                "WORLD_SIZE": world,
                "LOCAL_RANK": local,
                "LOCAL_WORLD_SIZE": per_node,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "PYTHONPATH": REPO,
            }
            script = " ".join([sys.executable, *argv])
            commands.append(" ".join(f"{k}={v}" for k, v in env.items()) + f" {script}")
        if nodes == 1:
            for command in commands:
                procs.append(
                    subprocess.Popen(
                        ["sh", "-c", f"exec env {command}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                    )
                )
            continue
        ranks = " ".join(f'env {command} & pids="$pids $!";' for command in commands)
        wait_all = "status=0; for p in $pids; do wait $p || status=1; done; exit $status"
        procs.append(
            subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f"mount -t tmpfs tmpfs {node_disk} && {ranks} {wait_all}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )  # fmt: skip
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    print("\n".join(outputs))
    return [proc.returncode for proc in procs]


def run_script(name: str, *args, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run tests/scripts/NAME with this interpreter; the result's output is text."""
    return subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=kwargs.pop("env", script_env()),
        **kwargs,
    )


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python -m core ARGS...`, run in this process: its exit code and what it printed."""
    from core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["python", "-m", "core", *map(str, args)], code, out.getvalue(), err.getvalue())


def wait_until(condition, timeout: float = 60, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def unwritable(directory):
    if os.geteuid() != 0:
        os.chmod(directory, 0o500)
        try:
            yield
        finally:
            os.chmod(directory, 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)]).returncode != 0:
        pytest.skip("running as root without a working chattr: cannot make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def burn_cpu(seconds: float) -> None:
    """A writer init function that starts slowly but surely (busy for `seconds`)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def sleep_for(seconds: float) -> None:
    """A writer init function that waits on nothing, making no progress, for `seconds`."""
    time.sleep(seconds)


def exit_at_once(code: int) -> None:
    """A writer init function whose process dies before it is ready."""
    os._exit(code)


def user_init(*args) -> None:
    """A writer init function of the user's (it does nothing, but the writer that ran it is the user's)."""


def ctrl_c_at(point: int, operation) -> tuple[int, bool]:
    """Run `operation()`, sending SIGINT at its `point`-th signal check; returns (checks seen,
    whether a KeyboardInterrupt came out).

    The checks are where CPython looks for signals in the main thread (a Python function's first
    instruction, and the return of a C call), and the SIGINT is real, so the handler in force
    there runs: a KeyboardInterrupt, or a deferral where SIGINT is deferred. Running an
    operation once for every point covers all of it, deterministically. (point 0: none sent.)"""
    seen = 0

    def profile(frame, event, arg):
        nonlocal seen
        if event in ("call", "c_return"):
            seen += 1
            if seen == point:
                signal.raise_signal(signal.SIGINT)

    sys.setprofile(profile)
    try:
        operation()
        return seen, False
    except KeyboardInterrupt:
        return seen, True
    finally:
        sys.setprofile(None)
