"""Sharded checkpoints (state dicts holding DTensors) with real process groups: gloo, 1-4 ranks.

Each launch starts the ranks of tests/scripts/sharded_worker.py as torchrun would; the worker
asserts what every rank sees (bit-identical state after a load at another world size, the next
loss of a run that never stopped, each rank's file holding only its own chunks).
"""

import json
import os

import pytest
import torch

from core import CheckpointReader, CorruptCheckpointError, list_checkpoints
from tests.helpers import SCRIPTS, assert_same, launch_ranks, run_cli

pytestmark = pytest.mark.slow  # every test starts 2-4 ranks of torch.distributed

WORKER = os.path.join(SCRIPTS, "sharded_worker.py")


def run(world: int, scenario: str, layout: str, out, mode: str = "async") -> None:
    codes = launch_ranks(world, [WORKER, scenario, layout, mode, str(out)], timeout=600)
    assert codes == [0] * world, codes


def listed(folder, name: str):
    (info,) = [info for info in list_checkpoints(folder) if info.name == name]
    return info


def committed_files(checkpoint) -> list[str]:
    """What a committed sharded checkpoint consists of, by its commit record."""
    record = json.loads((checkpoint / "commit.json").read_text())
    return sorted([".metadata", "commit.json", record["index_file"], *(f["file"] for f in record["files"])])


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_fsdp_state_saved_on_2_ranks_loads_bit_exact_on_1_2_3_and_4(tmp_path, mode):
    run(2, "save", "fsdp", tmp_path, mode)
    run(1, "load_from_fsdp", "plain", tmp_path, mode)  # a plain, unsharded model on one process
    for world in (2, 3, 4):
        run(world, "load_from_fsdp", "fsdp", tmp_path, mode)
    run(1, "whole", "plain", tmp_path, mode)


def test_a_2x2_fsdp_by_tensor_parallel_mesh_loads_on_4_and_on_2(tmp_path):
    run(4, "save", "2x2", tmp_path)
    run(4, "load_from_2x2", "2x2", tmp_path)
    run(2, "load_from_2x2", "fsdp", tmp_path)


def test_the_files_are_dcps_own_and_our_tools_read_them(tmp_path):
    run(2, "save", "fsdp", tmp_path)
    checkpoint = tmp_path / "ckpt"
    record = json.loads((checkpoint / "commit.json").read_text())
    assert sorted(os.listdir(checkpoint)) == committed_files(checkpoint)
    for entry in record["files"]:
        assert entry["file"].startswith(f"__{entry['rank']}_") and entry["file"].endswith(".distcp"), entry
    info = listed(tmp_path, "ckpt")
    assert info.complete and info.step == 2 and info.world_size == 2, info
    assert run_cli("verify", checkpoint).returncode == 0
    inspected = json.loads(run_cli("inspect", checkpoint, "--json").stdout)
    shapes = {t["key"]: t["shape"] for t in inspected["tensors"]}
    assert shapes["model.0.weight"] == [33, 17] and shapes["optim.state.2.weight.exp_avg"] == [7, 33]
    assert inspected["values"]["step"] == "2"
    converted = run_cli("convert", checkpoint, tmp_path / "model.pt", "--key", "model")
    assert converted.returncode == 0, converted.stderr
    expected = torch.load(tmp_path / "reference_fsdp.pt", weights_only=True)["state"]["model"]
    assert_same(torch.load(tmp_path / "model.pt", weights_only=True), dict(expected))


def test_a_damaged_byte_is_found_by_verify_and_refused_by_a_load(tmp_path):
    run(2, "save", "fsdp", tmp_path)
    checkpoint = tmp_path / "ckpt"
    record = json.loads((checkpoint / "commit.json").read_text())
    index = json.loads((checkpoint / record["index_file"]).read_text())
    item = next(i for i in index["items"] if i["fqn"] == "model.0.weight" and i["file"] == record["files"][1]["file"])
    with open(checkpoint / item["file"], "r+b") as f:
        f.seek(item["data_offset"] + 5)
        byte = f.read(1)
        f.seek(item["data_offset"] + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    verified = run_cli("verify", checkpoint)
    assert verified.returncode == 1 and "model.0.weight" in verified.stdout, verified.stdout
    with pytest.raises(CorruptCheckpointError, match="model.0.weight"):
        CheckpointReader().read(str(checkpoint))
    partial = {"model": {"0.bias": torch.zeros(33)}}  # the damaged tensor is not read
    CheckpointReader().read(str(checkpoint), partial)
    expected = torch.load(tmp_path / "reference_fsdp.pt", weights_only=True)["state"]["model"]["0.bias"]
    assert torch.equal(partial["model"]["0.bias"], expected)


def test_a_rank_killed_mid_save_commits_nothing_and_the_previous_checkpoint_still_loads(tmp_path):
    codes = launch_ranks(2, [WORKER, "crash", "fsdp", "async", str(tmp_path)], timeout=600)
    assert codes == [0, 0], codes  # rank 1's writer was SIGKILLed; both trainers saw the save fail
    checkpoint = tmp_path / "ckpt"
    info = listed(tmp_path, "ckpt")
    assert info.complete and info.step == 2, info
    # Only the step-2 checkpoint's files: the surviving rank removed its part, the dead writer's
    # trainer removed the dead writer's temporary folder.
    assert sorted(os.listdir(checkpoint)) == committed_files(checkpoint)
    run(1, "load_from_fsdp", "plain", tmp_path)  # the step-2 checkpoint, whole, at other world sizes
    run(3, "load_from_fsdp", "fsdp", tmp_path)
    before = set(committed_files(checkpoint))
    run(2, "save", "fsdp", tmp_path)  # an overwrite replaces every file of the checkpoint it replaces
    assert sorted(os.listdir(checkpoint)) == committed_files(checkpoint)
    assert before & set(committed_files(checkpoint)) == {".metadata", "commit.json"}


def test_partial_dtensors_are_refused_and_replicated_ones_written_once(tmp_path):
    run(2, "refuse", "fsdp", tmp_path)


def test_a_checkpoint_stock_dcp_wrote_loads_at_another_world_size(tmp_path):
    run(2, "stock", "fsdp", tmp_path, "sync")
    run(3, "stock", "fsdp", tmp_path, "sync")
    info = listed(tmp_path, "stock")
    assert info.complete and info.kind == "directory"
    assert run_cli("verify", tmp_path / "stock").returncode == 0
