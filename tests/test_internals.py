"""Every private framework name async-ckpt relies on, one test each (the test's id is the name):
a framework release that moves one fails here, naming it, before any checkpoint is touched."""

import warnings

import lightning as L
import pytest
import torch
from accelerate import Accelerator

import core.torch_internals as ti
from accelerate_ckpt import accelerate_internals
from core import internals, safetensors_internals
from lightning_ckpt import AsyncCheckpointIO
from lightning_ckpt.lightning_internals import logging_step, trainer_of
from tests.lightning_helpers import TinyClassifier, tiny_data


@pytest.mark.parametrize(
    "name", ti.NAMES + ti.DISTRIBUTED_NAMES + safetensors_internals.NAMES + accelerate_internals.NAMES
)
def test_the_name_is_where_async_ckpt_looks_for_it(name):
    internals.lookup(name, "the framework", "installed", "tested")


def test_a_name_that_moved_fails_with_that_name(monkeypatch):
    monkeypatch.delattr(torch._utils, "_rebuild_tensor_v3")
    with pytest.raises(internals.InternalsMovedError, match=r"torch\._utils\._rebuild_tensor_v3.*torch 9\.9"):
        internals.lookup("torch._utils._rebuild_tensor_v3", "torch", "9.9", ti.TESTED_TORCH)


def test_torch_file_reader_and_writer_reserve_and_locate_records(tmp_path):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "a.pt")
    with open(tmp_path / "a.pt", "rb") as f:
        reader = ti.FileReader(f)
        offset = ti.record_offset(reader, "data/0")
        f.seek(offset)
        assert torch.frombuffer(bytearray(f.read(16)), dtype=torch.float32).tolist() == [0.0, 1.0, 2.0, 3.0]
    writer = ti.FileWriter(str(tmp_path / "b.pt"), True, 4096)
    ti.reserve_record(writer, "data/0", 1 << 20)
    writer.write_end_of_file()
    del writer
    assert (tmp_path / "b.pt").stat().st_size > 1 << 20  # the room was made, no byte of it written


def test_torch_rebuild_calls_rebuild_what_torch_save_pickles():
    storage = torch.arange(6.0).untyped_storage()
    typed = ti.typed_storage(storage, torch.float32)
    tensor = ti.rebuild_tensor_v2(typed, 1, (2,), (1,), False, {})
    assert tensor.tolist() == [1.0, 2.0]
    flags = ti.typed_storage(torch.ones(2, dtype=torch.bool).untyped_storage(), torch.bool)
    bits = ti.rebuild_tensor_v3(flags, 0, (2,), (1,), False, {}, torch.bool)
    assert bits.dtype == torch.bool
    parameter = ti.rebuild_parameter(tensor, True, {})
    assert isinstance(parameter, torch.nn.Parameter) and parameter.requires_grad
    assert ti.rebuild_parameter_with_state(tensor, False, {}, None).requires_grad is False
    marked = torch.ones(2)
    marked.note = "kept"
    state = ti.object_state(marked)
    rebuilt = ti.rebuild_from_type_v2(ti.rebuild_tensor_v2, torch.Tensor, (typed, 0, (2,), (1,), False, {}), state)
    assert rebuilt.note == "kept"
    assert ti.tensor_metadata(torch.ones(2, dtype=torch.complex64).conj()) == {"conj": True}


def test_torch_storage_tables_and_typed_storages_without_a_warning():
    assert ti.storage_type_names()[torch.float32] == "FloatStorage"
    assert torch.uint16 in ti.untyped_storage_dtypes()
    assert ti.element_size(torch.bfloat16) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ti.typed_storage(torch.UntypedStorage(8), torch.float32)


def test_torch_storage_identity_and_version_counter():
    base = torch.zeros(4)
    assert ti.storage_key(base.untyped_storage()) == ti.storage_key(base[1:].untyped_storage())
    before = ti.version_counter(base)
    base.add_(1)
    assert ti.version_counter(base) == before + 1


def test_torch_shared_memory_descriptors_round_trip():
    storage = torch.arange(3.0).untyped_storage()
    storage.share_memory_()
    fd = ti.share_fd(storage)
    again = ti.storage_from_shared_fd(fd, storage.nbytes())
    assert torch.equal(torch.empty(0).set_(again), torch.arange(3.0))
    assert ti.new_shared_storage(16).is_shared()


def test_torch_copy_many():
    destinations, sources = [torch.zeros(2), torch.zeros(3)], [torch.ones(2), torch.full((3,), 2.0)]
    ti.copy_many(destinations, sources)
    assert destinations[0].tolist() == [1.0, 1.0] and destinations[1].tolist() == [2.0, 2.0, 2.0]


def test_safetensors_dtype_codes():
    assert safetensors_internals.dtype_codes()["BF16"] is torch.bfloat16


def test_lightning_module_knows_its_trainer():
    module = TinyClassifier()
    assert trainer_of(module) is None
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    assert trainer_of(module) is trainer


def test_the_logging_step_counts_the_optimizer_steps_taken():
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    assert logging_step(trainer) == 0
    trainer.fit(TinyClassifier(), tiny_data())
    assert logging_step(trainer) == trainer.global_step == 3


def test_model_parallel_strategy_has_what_the_sharded_seam_wraps():
    from lightning.fabric.strategies import model_parallel as fabric_model_parallel
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_ckpt.lightning_internals import saves_distributed_checkpoints

    assert saves_distributed_checkpoints(ModelParallelStrategy())
    assert not saves_distributed_checkpoints(ModelParallelStrategy(save_distributed_checkpoint=False))
    assert callable(fabric_model_parallel._distributed_checkpoint_load)
    AsyncCheckpointIO()  # installs the seam
    for name in ("save_checkpoint", "load_checkpoint", "teardown"):
        assert getattr(ModelParallelStrategy, name).__module__ == "lightning_ckpt.lightning_internals", name
    assert fabric_model_parallel._distributed_checkpoint_load.__module__ == "lightning_ckpt.lightning_internals"


def test_accelerator_lists_what_prepare_and_register_for_checkpointing_registered():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    prepared = accelerator.prepare(model, optimizer, scheduler, loader)

    class Counter:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    hook = accelerator.register_save_state_pre_hook(lambda models, weights, folder: None)
    assert accelerate_internals.models(accelerator) == [prepared[0]]
    assert accelerate_internals.optimizers(accelerator) == [prepared[1]]
    assert accelerate_internals.schedulers(accelerator) == [prepared[2]]
    assert accelerate_internals.dataloaders(accelerator) == [prepared[3]]
    assert accelerate_internals.custom_objects(accelerator) == [counter]
    assert len(accelerate_internals.save_model_state_pre_hooks(accelerator)) == 1
    hook.remove()
    cleaned = accelerate_internals.clean_state_dict_for_safetensors({"a": torch.ones(2), "b": torch.ones(2)})
    assert set(cleaned) == {"a", "b"}
