"""Several real ranks (gloo on 127.0.0.1): per-rank files, rank 0's commit record, failures across ranks.

Each launch starts WORLD processes of tests/scripts/multi_rank_worker.py, as torchrun would, and waits
for them with a bounded timeout; the scenarios themselves assert what every rank sees.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, SCRIPTS, free_port

WORKER = os.path.join(SCRIPTS, "multi_rank_worker.py")


pytestmark = pytest.mark.slow  # real processes started, killed and signalled: the long tests


def launch(world: int, mode: str, scenario: str, out, timeout: float = 240, nodes: int = 1) -> list[int]:
    """Run one scenario on `world` ranks spread over `nodes`; returns the exit codes, one per rank
    (one per node when nodes > 1). With several nodes each one runs in a mount namespace of its
    own with a private tmpfs at `out`: a machine with its own local disk."""
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
            commands.append(
                " ".join(f"{k}={v}" for k, v in env.items()) + f" {sys.executable} {WORKER} {mode} {scenario} {out}"
            )
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
        script = f"mount -t tmpfs tmpfs {out} && {ranks} {wait_all}"
        procs.append(
            subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
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
    assert sorted(os.listdir(step1)) == [
        "checkpoint_0.pt",
        *[f"checkpoint_{r}.pt" for r in range(1, world)],
        "commit.json",
    ]
    record = json.loads((step1 / "commit.json").read_text())
    assert record["world_size"] == world and record["metadata"] == {"step": 1}
    assert [f["file"] for f in record["files"]] == [f"checkpoint_{r}.pt" for r in range(world)]
    assert not (tmp_path / "crashed" / "commit.json").exists()

    assert launch(world, mode, "resume", tmp_path) == [0] * world
    if world == 4:
        assert launch(2, mode, "reshape", tmp_path) == [0, 0]


def test_per_node_local_disks_commit_on_every_node(tmp_path):
    """4 ranks on 2 'machines', each with its own disk at the same path: every node gets its
    ranks' files and a commit record, and resumes from them."""
    assert launch(4, "async", "per_node", tmp_path, nodes=2) == [0, 0]
    assert os.listdir(tmp_path) == [], "the nodes' disks were their own, not the shared directory"
