"""Every private Lightning name the plugin relies on, reached from here only.

A CheckpointIO is never handed its Trainer; the plugin finds the Trainer that is saving from the
strategy on the call stack, through the LightningModule's `_trainer` (the attribute behind its
`trainer` property, which raises instead of returning None when no Trainer is attached).

ModelParallelStrategy (FSDP2 / tensor parallelism) never calls its CheckpointIO for sharded
checkpoints: it runs `torch.distributed.checkpoint.save` itself. `route_model_parallel_checkpoints`
is the one seam for that, installed once per process when an AsyncCheckpointIO is created: the
class's `save_checkpoint`, `load_checkpoint` and `teardown` (which Lightning's override leaves
without its CheckpointIO's teardown) hand over to the strategy's CheckpointIO when it
is ours and the strategy saves distributed checkpoints (`_save_distributed_checkpoint`), and
call Lightning's own otherwise. Fabric's `_distributed_checkpoint_load`, which Lightning's
loader calls with the module's and each optimizer's sharded state dict, reads a sharded
checkpoint that async-ckpt committed through our reader (checksums, commit checks) and any
other through DCP, as before. tests/test_internals.py checks every name with a real Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TESTED_LIGHTNING = "2.6"
METADATA_FILE = "meta.pt"  # what ModelParallelStrategy writes beside the shards (rank 0, torch.save)


def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None."""
    return module._trainer


def logging_step(trainer: Any) -> int:
    """The step Lightning logs metrics at now (the optimizer steps taken), as its own logger
    connector and LearningRateMonitor pass it to `Logger.log_metrics`."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def saves_distributed_checkpoints(strategy: Any) -> bool:
    """Whether a ModelParallelStrategy saves sharded checkpoints (its save_distributed_checkpoint)."""
    return bool(strategy._save_distributed_checkpoint)


class ShardedCheckpointIO:
    """What the seam hands a strategy's sharded checkpoints to (AsyncCheckpointIO implements it)."""

    def save_sharded(self, strategy: Any, checkpoint: dict[str, Any], path: str) -> None:
        raise NotImplementedError

    def before_sharded_load(self, strategy: Any, path: str) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError


_routed = False


def route_model_parallel_checkpoints(handler_of: Callable[[Any], ShardedCheckpointIO | None]) -> None:
    """Install the seam (see the module docstring); idempotent. `handler_of(strategy)` is the
    handler of that strategy's sharded checkpoints, or None to leave them to Lightning."""
    global _routed
    if _routed:
        return
    from lightning.fabric.strategies import model_parallel as fabric_model_parallel
    from lightning.pytorch.strategies.model_parallel import ModelParallelStrategy

    lightning_save = ModelParallelStrategy.save_checkpoint
    lightning_load = ModelParallelStrategy.load_checkpoint
    lightning_teardown = ModelParallelStrategy.teardown
    dcp_load = getattr(fabric_model_parallel, "_distributed_checkpoint_load")  # noqa: B009 (not exported)

    def save_checkpoint(self: Any, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        handler = handler_of(self)
        if handler is None or storage_options is not None or not saves_distributed_checkpoints(self):
            return lightning_save(self, checkpoint, filepath, storage_options)
        handler.save_sharded(self, checkpoint, str(self.broadcast(filepath)))  # every rank: rank 0's path
        return None

    def load_checkpoint(self: Any, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        handler = handler_of(self)
        if handler is not None:
            handler.before_sharded_load(self, str(self.broadcast(checkpoint_path)))
        loaded: dict[str, Any] = lightning_load(self, checkpoint_path, weights_only=weights_only)
        return loaded

    def teardown(self: Any) -> None:
        try:
            lightning_teardown(self)
        finally:
            handler = handler_of(self)
            if handler is not None:
                handler.teardown()  # (Lightning's override does not call its CheckpointIO's teardown)

    def distributed_checkpoint_load(module_state: dict[str, Any], path: Any) -> None:
        from core import CheckpointReader
        from core.sharded_load import committed_by_us

        if not committed_by_us(str(path)):
            dcp_load(module_state, path)
            return None
        CheckpointReader().read(str(path), module_state, strict=True)
        return None

    ModelParallelStrategy.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
    ModelParallelStrategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
    ModelParallelStrategy.teardown = teardown  # type: ignore[method-assign]
    setattr(fabric_model_parallel, "_distributed_checkpoint_load", distributed_checkpoint_load)  # noqa: B010
    _routed = True
