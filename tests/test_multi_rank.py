"""Several real ranks (gloo on 127.0.0.1): per-rank files, rank 0's commit record, failures across ranks.

Each launch starts WORLD processes of tests/scripts/multi_rank_worker.py, as torchrun would, and waits
for them with a bounded timeout; the scenarios themselves assert what every rank sees.
"""

import json
import os
import signal

import pytest

from tests.helpers import SCRIPTS, launch_ranks

WORKER = os.path.join(SCRIPTS, "multi_rank_worker.py")


pytestmark = pytest.mark.slow  # real processes started, killed and signalled: the long tests


def launch(world: int, mode: str, scenario: str, out, timeout: float = 240, nodes: int = 1) -> list[int]:
    return launch_ranks(world, [WORKER, mode, scenario, str(out)], timeout=timeout, nodes=nodes, node_disk=out)


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
