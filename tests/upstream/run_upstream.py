"""Run the upstream test suites with async-ckpt swapped in, and stock, and print the counts.

    python tests/upstream/run_upstream.py --lightning LIGHTNING_CHECKOUT \
        --accelerate ACCELERATE_CHECKOUT --torch-tests TORCH_EXPERIMENTAL_TEST_DIR [--work DIR]

Each suite is laid out in a work folder outside the repository (nothing of theirs is copied into
ours): Lightning's `tests/tests_pytorch` from a checkout of the tag closest to the installed
Lightning (2.6.5 for 2.6.6), run with `-p lightning_swap` (every Trainer's default CheckpointIO
becomes AsyncCheckpointIO; ASYNC_SWAP=0 for stock); Accelerate's `tests/test_state_checkpointing.py`
and `tests/test_accelerator.py` with `accelerate_conftest.py` as their conftest (the hook on every
Accelerator; no conftest for stock); PyTorch's `_experimental` test files with their imports
rewritten to `core` (stock: as they are). Each needs this project installed in the interpreter
that runs this script, plus the suites' own test dependencies (cloudpickle, jsonargparse,
tensorboardX, pandas for Lightning; parameterized and torchdata for Accelerate; expecttest for
PyTorch). A failure counts only where the stock run passes; docs/upstream.md lists each one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIGHTNING_FILES = [
    "checkpointing/test_model_checkpoint.py",
    "checkpointing/test_checkpoint_callback_frequency.py",
    "checkpointing/test_trainer_checkpoint.py",
    "checkpointing/test_torch_saving.py",
    "plugins/test_checkpoint_io_plugin.py",
    "plugins/test_async_checkpoint.py",
    "trainer/connectors/test_checkpoint_connector.py",
    "models/test_restore.py",
]
ACCELERATE_FILES = ["test_state_checkpointing.py", "test_accelerator.py"]
_EXPERIMENTAL = re.compile(r"torch\.distributed\.checkpoint\._experimental(\.[a-z_]+)?")
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors)")


def _pytest(folder: str, args: list[str], env: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--timeout", "600", *args],
        cwd=folder,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    lines = result.stdout.splitlines()
    counts = {kind.rstrip("s"): int(n) for line in lines[-3:] for n, kind in _SUMMARY.findall(line)}
    failed = sorted(line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR ")))
    return counts, failed


def lightning(checkout: str, work: str) -> dict[str, tuple[dict[str, int], list[str]]]:
    folder = os.path.join(work, "lightning")
    shutil.copytree(os.path.join(checkout, "tests", "tests_pytorch"), os.path.join(folder, "tests", "tests_pytorch"))
    shutil.copy(os.path.join(HERE, "lightning_swap.py"), folder)
    args = ["-p", "lightning_swap", *(f"tests/tests_pytorch/{name}" for name in LIGHTNING_FILES)]
    env = {"PYTHONPATH": folder}
    return {"swapped": _pytest(folder, args, env), "stock": _pytest(folder, args, {**env, "ASYNC_SWAP": "0"})}


def accelerate(checkout: str, work: str) -> dict[str, tuple[dict[str, int], list[str]]]:
    folder = os.path.join(work, "accelerate")
    os.makedirs(folder)
    for name in ACCELERATE_FILES:
        shutil.copy(os.path.join(checkout, "tests", name), folder)
    stock = _pytest(folder, ACCELERATE_FILES, {})
    shutil.copy(os.path.join(HERE, "accelerate_conftest.py"), os.path.join(folder, "conftest.py"))
    return {"swapped": _pytest(folder, ACCELERATE_FILES, {}), "stock": stock}


def torch_experimental(tests: str, work: str) -> dict[str, tuple[dict[str, int], list[str]]]:
    runs = {}
    for kind in ("stock", "swapped"):
        folder = os.path.join(work, f"torch_{kind}")
        os.makedirs(folder)
        shutil.copy(os.path.join(HERE, "torch_conftest.py"), os.path.join(folder, "conftest.py"))
        for name in sorted(os.listdir(tests)):
            if name.startswith("test_") and name.endswith(".py"):
                with open(os.path.join(tests, name)) as f:
                    text = f.read()
                with open(os.path.join(folder, name), "w") as f:
                    f.write(_EXPERIMENTAL.sub("core", text) if kind == "swapped" else text)
        runs[kind] = _pytest(folder, ["."], {})
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lightning", help="a Lightning checkout (its tests/tests_pytorch)")
    parser.add_argument("--accelerate", help="an Accelerate checkout (its tests/)")
    parser.add_argument("--torch-tests", help="a folder of PyTorch's test/distributed/checkpoint/_experimental files")
    parser.add_argument("--work", help="where to lay the suites out (default: a new temporary folder)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="async-ckpt-upstream-")
    suites = {"lightning": (lightning, args.lightning), "accelerate": (accelerate, args.accelerate)}
    suites["torch _experimental"] = (torch_experimental, args.torch_tests)
    for name, (run, source) in suites.items():
        if source is None:
            continue
        for kind, (counts, failed) in run(source, work).items():
            print(f"{name} {kind}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
            for test in failed:
                print(f"    {test}")
    print(f"(laid out in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
