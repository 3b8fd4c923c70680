"""One rank of the sharded-checkpoint tests: python tests/scripts/sharded_worker.py SCENARIO LAYOUT MODE OUT.

LAYOUT is how the model is laid over the ranks: "plain" (one process, no sharding), "fsdp"
(fully_shard over every rank) or "2x2" (a data x tensor parallel mesh of 4 ranks: fully_shard
over tensor-parallel layers). MODE is sync or async. The launcher (tests/test_sharded.py) sets
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Each scenario asserts what every rank must see.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from core import (
    BarrierTimeoutError,
    CheckpointerConfig,
    CheckpointWriteError,
    CheckpointWriterConfig,
    UnsupportedStateError,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from core.sharding import local_chunk, writes_chunk
from tests.helpers import DiesBeforeCommit, assert_same, clone_tree

HIDDEN = {"fsdp": 33, "plain": 33, "2x2": 34}  # 33 rows shard unevenly over 2, 3 and 4 ranks


def build(layout: str, hidden: int, seed: int):
    """Linear(17, hidden) -> ReLU -> Linear(hidden, 7) laid out as `layout`, with AdamW."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(17, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 7))
    mesh = None
    if layout == "2x2":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    if layout in ("fsdp", "2x2"):
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=None if mesh is None else mesh["dp"])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch(step: int) -> torch.Tensor:
    """The same batch on every rank (so the loss does not depend on the world size)."""
    return torch.randn(4, 17, generator=torch.Generator().manual_seed(step))


def train(model, optimizer, steps) -> None:
    for step in steps:
        optimizer.zero_grad()
        model(batch(step)).square().mean().backward()
        optimizer.step()


def loss_of(model, step: int) -> torch.Tensor:
    with torch.no_grad():
        return model(batch(step)).square().mean()


def state_of(model, optimizer, step: int) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)  # (also creates AdamW's state)
    return {"model": model_state, "optim": optimizer_state, "step": step}


def full_state(model, optimizer) -> dict:
    """A copy of the whole state as plain CPU tensors (on rank 0; a collective every rank must call)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return clone_tree({"model": model_state, "optim": optimizer_state})  # (CPU tensors come back uncopied)


def checkpointer(mode: str, timeout_secs: float = 120, commit_hook=None):
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=timeout_secs))
    factory = make_async_checkpointer if mode == "async" else make_sync_checkpointer
    return factory(config, commit_hook=commit_hook)


def save(ckpt, path: str, state: dict, step: int):
    """Save; returns the write future of an async checkpointer (None for a sync one: committed)."""
    if hasattr(ckpt, "prepare"):
        _, written = ckpt.save(path, state, step=step)
        return written
    ckpt.save(path, state, step=step)
    return None


def my_chunks(state: dict) -> dict[str, list]:
    """The chunks this rank's file must hold: [offsets, sizes] by flat name."""
    from core.torch_internals import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    rank = dist.get_rank()
    mine = {}
    for fqn, value in flat.items():
        if isinstance(value, DTensor):
            if writes_chunk(value, fqn) and value.to_local().numel():
                offsets, sizes = local_chunk(value)
                mine[fqn] = [list(offsets), list(sizes)]
        elif isinstance(value, torch.Tensor) and rank == 0:
            mine[fqn] = [[0] * value.dim(), list(value.shape)]
    return mine


def check_each_rank_holds_only_its_bytes(path: str, state: dict) -> None:
    """Every rank's file holds exactly the chunks that rank owns, each tensor byte once."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, my_chunks(state))
    if dist.get_rank() != 0:
        return
    record = read_json(os.path.join(path, "commit.json"))
    index = read_json(os.path.join(path, record["index_file"]))
    for entry in record["files"]:
        held = {
            item["fqn"]: [item["offsets"], item["sizes"]]
            for item in index["items"]
            if item["file"] == entry["file"] and item["dtype"] is not None
        }
        assert held == everyone[entry["rank"]], (entry["rank"], held, everyone[entry["rank"]])
        tensor_items = [i for i in index["items"] if i["file"] == entry["file"] and i["dtype"] is not None]
        assert entry["nbytes"] == sum(i["nbytes"] for i in tensor_items)
    chunks = [(i["fqn"], tuple(i["offsets"])) for i in index["items"] if i["dtype"] is not None]
    assert len(chunks) == len(set(chunks)), "a chunk was written twice"


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ scenarios


def save_scenario(layout: str, mode: str, out: str) -> None:
    """Train 2 steps, keep the reference (whole state, next loss), save, train on during the write."""
    model, optimizer = build(layout, HIDDEN[layout], seed=0)
    train(model, optimizer, range(2))
    reference = full_state(model, optimizer)
    next_loss = loss_of(model, 2)
    state = state_of(model, optimizer, step=2)
    with checkpointer(mode) as ckpt:
        written = save(ckpt, f"{out}/ckpt", state, step=2)
        train(model, optimizer, [2])  # the snapshot is taken: training goes on while the file is written
        if written is not None:
            result = written.result()
            assert result.files[0].startswith(f"{out}/ckpt/__{dist.get_rank()}_"), result.files
    check_each_rank_holds_only_its_bytes(f"{out}/ckpt", state)
    if dist.get_rank() == 0:
        torch.save({"state": reference, "next_loss": next_loss}, f"{out}/reference_{layout}.pt")


def load_scenario(layout: str, mode: str, out: str, saved_layout: str) -> None:
    """Load into a freshly initialised model of `layout` (ours, then stock DCP's load): the whole
    state is bit-identical to what was saved, and the next loss is the one the saving run had."""
    expected = torch.load(f"{out}/reference_{saved_layout}.pt", weights_only=True)
    for loader in ("ours", "dcp"):
        model, optimizer = build(layout, HIDDEN[saved_layout], seed=123)
        state = state_of(model, optimizer, step=0)
        if loader == "ours":
            with checkpointer(mode) as ckpt:
                ckpt.load(f"{out}/ckpt", state, strict=True)
        else:
            dcp.load(state, checkpoint_id=f"{out}/ckpt")
        assert state["step"] == 2
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        loaded = full_state(model, optimizer)
        if dist.get_rank() == 0:
            assert_same(loaded, expected["state"])
        if layout == saved_layout or "2x2" not in (layout, saved_layout):
            # (tensor parallelism sums partial products in another order: equal state, not equal bits)
            assert torch.equal(loss_of(model, 2), expected["next_loss"]), (loss_of(model, 2), expected["next_loss"])


def whole_scenario(layout: str, mode: str, out: str) -> None:
    """A load without a state dict: the whole checkpoint as plain tensors, as it was nested."""
    expected = torch.load(f"{out}/reference_fsdp.pt", weights_only=True)["state"]
    with checkpointer(mode) as ckpt:
        whole = ckpt.load(f"{out}/ckpt")
    assert whole["step"] == 2
    assert_same(whole["model"], dict(expected["model"]))
    for key, value in expected["optim"]["state"].items():
        assert_same(whole["optim"]["state"][key], value)


def crash_scenario(layout: str, mode: str, out: str) -> None:
    """A rank's writer dies in the middle of overwriting a committed checkpoint: nothing is
    committed, and the checkpoint that was there stays whole (the test then loads it)."""
    save_scenario(layout, mode, out)  # step 2, committed
    model, optimizer = build(layout, HIDDEN[layout], seed=0)
    train(model, optimizer, range(3))
    dies = DiesBeforeCommit(step=3) if dist.get_rank() == 1 else None
    with checkpointer(mode, timeout_secs=20, commit_hook=dies) as ckpt:
        try:
            result = save(ckpt, f"{out}/ckpt", state_of(model, optimizer, step=3), step=3)
            if result is not None:
                result.result()
        except (BarrierTimeoutError, CheckpointWriteError) as exc:
            print(f"rank {dist.get_rank()}: the save failed as it must: {type(exc).__name__}", flush=True)
        else:
            raise AssertionError("the save whose rank died was committed")
        record = read_json(f"{out}/ckpt/commit.json")
        assert record["metadata"] == {"step": 2}, record
    print(f"rank {dist.get_rank()}: crash scenario passed", flush=True)
    os._exit(0)  # a rank's writer died: the process group cannot shut down cleanly


def refuse_scenario(layout: str, mode: str, out: str) -> None:
    """A Partial DTensor (a sum not yet reduced) is refused before anything is written."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    partial = DTensor.from_local(torch.ones(4), mesh, [Partial()])
    replicated = distribute_tensor(torch.arange(6.0), mesh, [Replicate()])
    with checkpointer(mode) as ckpt:
        try:
            save(ckpt, f"{out}/partial", {"sum": partial, "w": replicated}, step=1)
        except UnsupportedStateError as exc:
            assert "'sum'" in str(exc) and "Partial" in str(exc) and "redistribute" in str(exc), exc
        else:
            raise AssertionError("a Partial DTensor was saved")
        assert not os.path.exists(f"{out}/partial/commit.json")
        result = save(ckpt, f"{out}/replicated", {"w": replicated}, step=1)
        if result is not None:
            result.result()
        loaded = ckpt.load(f"{out}/replicated")
    assert torch.equal(loaded["w"], torch.arange(6.0))
    if dist.get_rank() == 0:
        index_name = read_json(f"{out}/replicated/commit.json")["index_file"]
        items = read_json(f"{out}/replicated/{index_name}")["items"]
        assert [(i["fqn"], i["file"].split("_")[2]) for i in items] == [("w", "0")], items  # written once, by rank 0


def stock_scenario(layout: str, mode: str, out: str) -> None:
    """A checkpoint stock dcp.save wrote loads through us at another world size, and our tools see it."""
    if dist.get_world_size() == 2:
        model, optimizer = build(layout, HIDDEN[layout], seed=0)
        train(model, optimizer, range(2))
        reference = full_state(model, optimizer)
        dcp.save(state_of(model, optimizer, step=2), checkpoint_id=f"{out}/stock")
        if dist.get_rank() == 0:
            torch.save({"state": reference}, f"{out}/reference_stock.pt")
        return
    expected = torch.load(f"{out}/reference_stock.pt", weights_only=True)["state"]
    model, optimizer = build(layout, HIDDEN[layout], seed=123)
    state = state_of(model, optimizer, step=0)
    with checkpointer(mode) as ckpt:
        ckpt.load(f"{out}/stock", state, strict=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = full_state(model, optimizer)
    if dist.get_rank() == 0:
        assert_same(loaded, expected)


def main() -> None:
    scenario, layout, mode, out = sys.argv[1:5]
    dist.init_process_group("gloo")
    try:
        if scenario.startswith("load_from_"):
            load_scenario(layout, mode, out, saved_layout=scenario.removeprefix("load_from_"))
        else:
            scenarios = {
                "save": save_scenario,
                "whole": whole_scenario,
                "crash": crash_scenario,
                "refuse": refuse_scenario,
                "stock": stock_scenario,
            }
            scenarios[scenario](layout, mode, out)
        dist.barrier()
        print(f"rank {dist.get_rank()}: {scenario} passed", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # gloo's C++ threads sometimes abort the interpreter's exit after destroy_process_group
    # ("terminate called without an active exception"); every check has passed by now.
    os._exit(0)
