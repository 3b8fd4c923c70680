"""Several real ranks (gloo on 127.0.0.1): per-rank files, rank 0's commit record, failures across ranks.

Each launch starts WORLD processes of tests/multi_rank_worker.py, as torchrun would, and waits
for them with a bounded timeout; the scenarios themselves assert what every rank sees.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multi_rank_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, scenario: str, out, timeout: float = 240) -> list[int]:
    """Run one scenario on `world` ranks; returns their exit codes (output shown on failure)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": REPO}
        procs.append(subprocess.Popen([sys.executable, WORKER, mode, scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    codes = [proc.returncode for proc in procs]
    print("\n".join(outputs))
    return codes


@pytest.mark.parametrize("mode,world", [("async", 4), ("sync", 2)])
def test_ranks_commit_together_fail_together_and_resume(tmp_path, mode, world):
    codes = launch(world, mode, "train", tmp_path)
    # the last rank kills itself before its final save; every other rank passed its checks
    assert codes == [0] * (world - 1) + [-signal.SIGKILL], codes

    step1 = tmp_path / "step1"
    assert sorted(os.listdir(step1)) == ["checkpoint_0.pt", *[f"checkpoint_{r}.pt" for r in range(1, world)], "commit.json"]
    record = json.loads((step1 / "commit.json").read_text())
    assert record["world_size"] == world and record["metadata"] == {"step": 1}
    assert [f["file"] for f in record["files"]] == [f"checkpoint_{r}.pt" for r in range(world)]
    assert not (tmp_path / "crashed" / "commit.json").exists()

    assert launch(world, mode, "resume", tmp_path) == [0] * world
    if world == 4:
        assert launch(2, mode, "reshape", tmp_path) == [0, 0]
