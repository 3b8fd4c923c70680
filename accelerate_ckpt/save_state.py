"""An asynchronous `accelerator.save_state()` that writes Accelerate's own files.

save_state() snapshots every object Accelerate would save (models, optimizers, schedulers,
samplers, scaler, RNG states, registered custom objects) and returns. The files, with
Accelerate's names and formats, are written in the background into a hidden staging folder
and published into the checkpoint folder once every rank's files are durable (core's
FileSetCheckpointer): a new folder appears whole; into an existing one only this save's files
are added or replaced. `total_limit` pruning runs after a newer checkpoint is published, and
`load_state()` and `end_training()` first wait for pending checkpoints (of any Accelerator of
the process).
"""

from __future__ import annotations

import collections
import copyreg
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.constants import (
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    SAFE_WEIGHTS_NAME,
    SAMPLER_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
    WEIGHTS_NAME,
)
from accelerate.utils.other import clean_state_dict_for_safetensors

from core import CheckpointerConfig, FileSetCheckpointer, NamedState, WriteResult, WriterHook, wait_for_pending_writes

logger = logging.getLogger(__name__)

PENDING_DIR = ".async_ckpt_pending"
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)")
_UNSUPPORTED = {
    DistributedType.FSDP: "FSDP",
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.MEGATRON_LM: "Megatron-LM",
    DistributedType.XLA: "XLA",
}


def unsupported_reason(accelerator: Accelerator) -> str | None:
    """Why this accelerator's saves must stay Accelerate's own, or None when they can be async."""
    name = _UNSUPPORTED.get(accelerator.distributed_type)
    if name is not None:
        return f"{name} checkpoints are written by {name} itself"
    if accelerator.device.type not in ("cpu", "cuda"):
        return f"RNG states of {accelerator.device.type} devices are saved by Accelerate only"
    return None


def _indexed(name: str, index: int) -> str:
    """Accelerate's naming of the i-th object's file: optimizer.bin, optimizer_1.bin, ..."""
    if index == 0:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}_{index}{dot}{suffix}"


def _rng_states(accelerator: Accelerator) -> dict[str, Any]:
    states: dict[str, Any] = {
        "step": accelerator.step,
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return states


def _shared_files(accelerator: Accelerator, weights: list[dict], safe_serialization: bool) -> list[NamedState]:
    """The files one process writes for everyone, named as save_accelerator_state names them."""
    files = []
    weights_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    for i, state in enumerate(weights):
        if safe_serialization:
            files.append(NamedState(_indexed(weights_name, i), clean_state_dict_for_safetensors(state), "safetensors"))
        else:
            files.append(NamedState(_indexed(weights_name, i), state))
    for i, optimizer in enumerate(accelerator._optimizers):
        files.append(NamedState(_indexed(f"{OPTIMIZER_NAME}.bin", i), optimizer.state_dict()))
    for i, scheduler in enumerate(accelerator._schedulers):
        files.append(NamedState(_indexed(f"{SCHEDULER_NAME}.bin", i), scheduler.state_dict()))
    for i, dataloader in enumerate(accelerator._dataloaders):
        files.extend(_dataloader_files(dataloader, i))
    if accelerator.scaler is not None:
        files.append(NamedState(SCALER_NAME, accelerator.scaler.state_dict()))
    for i, obj in enumerate(accelerator._custom_objects):
        files.append(NamedState(f"custom_checkpoint_{i}.pkl", obj.state_dict()))
    return files


def _dataloader_files(dataloader: Any, index: int) -> list[NamedState]:
    from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler

    files = []
    if isinstance(dataloader.dataset, IterableDatasetShard):
        sampler = dataloader.get_sampler()
        if isinstance(sampler, SeedableRandomSampler):
            files.append(NamedState(_indexed(f"{SAMPLER_NAME}.bin", index), sampler))
    if getattr(dataloader, "use_stateful_dataloader", False):
        files.append(NamedState(_indexed("dl_state_dict.bin", index), dataloader.state_dict()))
    return files


class _HookedMethod:
    """What stands in for one of the accelerator's methods while the hook is on."""

    def __init__(self, function: Callable[..., Any], doc: str | None) -> None:
        self._function = function
        self.__doc__ = doc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)


def _reduce_without_hooks(accelerator: Accelerator) -> Any:
    """Pickle an accelerator as Accelerate would, minus the hook: it unpickles with its own methods."""
    reduced: Any = object.__reduce_ex__(accelerator, 2)
    state = {k: v for k, v in reduced[2].items() if not isinstance(v, _HookedMethod)}
    return (reduced[0], reduced[1], state, *reduced[3:])


class AsyncSaveState:
    """Makes one Accelerator's save_state() asynchronous; see the module docstring.

    While active, `accelerator.save_state`, `load_state` and `end_training` are this handle's.
    wait() blocks until all checkpoints saved so far are committed and raises the first failure
    not yet seen; close() also stops the writer process and restores Accelerate's own methods.
    The accelerator stays picklable; an unpickled copy has Accelerate's own methods.
    """

    def __init__(self, accelerator: Accelerator, config: CheckpointerConfig, commit_hook: WriterHook | None) -> None:
        self._accelerator = accelerator
        self._saver = FileSetCheckpointer(config, commit_hook, accelerator.process_index, accelerator.num_processes)
        self._unlogged: collections.deque[WriteResult] = collections.deque()
        self._saver.on_committed.append(self._unlogged.append)
        self._originals = {name: getattr(accelerator, name) for name in ("save_state", "load_state", "end_training")}
        self._overridden = {name for name in self._originals if name in vars(accelerator)}
        copyreg.pickle(type(accelerator), _reduce_without_hooks)
        accelerator.save_state = _HookedMethod(self.save_state, self._originals["save_state"].__doc__)
        accelerator.load_state = _HookedMethod(self._load_state, self._originals["load_state"].__doc__)
        accelerator.end_training = _HookedMethod(self._end_training, self._originals["end_training"].__doc__)
        self._open = True

    @property
    def stats(self) -> Any:
        return self._saver.stats

    # -- the replacement methods

    def save_state(
        self,
        output_dir: str | os.PathLike[str] | None = None,
        safe_serialization: bool = True,
        **save_model_func_kwargs: Any,
    ) -> Path:
        """Snapshot everything accelerator.save_state() saves and return; the files follow.

        Returns what Accelerate returns: the folder, as given (or the automatic one)."""
        accelerator = self._accelerator
        self._saver.raise_unseen()
        self._log_to_trackers()
        final, returned = self._final_dir(output_dir)
        staging = self._staging_dir(final)
        if self._publishes():
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
            if not accelerator.project_configuration.automatic_checkpoint_naming:
                os.makedirs(final, exist_ok=True)  # as Accelerate does, before writing anything
        accelerator.wait_for_everyone()

        weights = [accelerator.get_state_dict(model, unwrap=False) for model in accelerator._models]
        for hook in accelerator._save_model_state_pre_hook.values():
            hook(accelerator._models, weights, staging)  # files it writes there are published with the rest
        files = [NamedState(f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl", _rng_states(accelerator))]
        if self._publishes():
            files = _shared_files(accelerator, weights, safe_serialization) + files
        self._saver.save(final, files, staging=staging, publishes=self._publishes(), after_publish=self._prune)
        accelerator.project_configuration.iteration += 1
        return returned

    def _load_state(self, input_dir: str | None = None, *args: Any, **kwargs: Any) -> Any:
        accelerator = self._accelerator
        if input_dir is not None:
            wait_for_pending_writes(os.path.expanduser(os.fspath(input_dir)))
        elif accelerator.project_configuration.automatic_checkpoint_naming:
            wait_for_pending_writes(os.path.join(accelerator.project_dir, "checkpoints"))
        self._saver.wait()
        self._log_to_trackers()
        return self._originals["load_state"](input_dir, *args, **kwargs)

    def _end_training(self, *args: Any, **kwargs: Any) -> Any:
        self._saver.release()
        self._log_to_trackers()
        return self._originals["end_training"](*args, **kwargs)

    # -- where files go

    def _final_dir(self, output_dir: str | os.PathLike[str] | None) -> tuple[str, Path]:
        """(where the checkpoint goes, what save_state returns for it)."""
        accelerator = self._accelerator
        configuration = accelerator.project_configuration
        if configuration.automatic_checkpoint_naming:
            base = os.path.join(accelerator.project_dir, "checkpoints")
            os.makedirs(base, exist_ok=True)
            final = os.path.join(base, f"checkpoint_{accelerator.save_iteration}")
            if os.path.exists(final):
                raise ValueError(
                    f"Checkpoint directory {final} ({accelerator.save_iteration}) already exists. Please manually "
                    "override `self.save_iteration` with what iteration to start with."
                )
            return final, Path(final)
        if output_dir is None:
            raise TypeError(
                "save_state() needs output_dir unless ProjectConfiguration(automatic_checkpoint_naming=True) is set"
            )
        return os.path.abspath(os.path.expanduser(os.fspath(output_dir))), Path(output_dir)

    def _staging_dir(self, final: str) -> str:
        """A private folder on the checkpoint's filesystem: beside the numbered folders that
        load_state() searches (in the project folder) with automatic naming, else inside the
        checkpoint folder itself, so nothing is created outside the folder the user named."""
        accelerator = self._accelerator
        if accelerator.project_configuration.automatic_checkpoint_naming:
            return os.path.join(accelerator.project_dir, PENDING_DIR, os.path.basename(final))
        return os.path.join(final, PENDING_DIR, f"save_{accelerator.save_iteration}")

    def _publishes(self) -> bool:
        accelerator = self._accelerator
        if accelerator.project_configuration.save_on_each_node:
            return accelerator.is_local_main_process
        return accelerator.is_main_process

    def _prune(self, final: str) -> None:
        """total_limit, applied after a newer checkpoint is published: never to one being written."""
        configuration = self._accelerator.project_configuration
        if not configuration.automatic_checkpoint_naming or configuration.total_limit is None:
            return
        base = os.path.dirname(final)
        numbered = sorted(
            (int(m.group(1)), name) for name in os.listdir(base) if (m := _CHECKPOINT_NAME.fullmatch(name))
        )
        trash_root = os.path.join(self._accelerator.project_dir, PENDING_DIR)
        for _, name in numbered[: max(len(numbered) - configuration.total_limit, 0)]:
            logger.info("deleting checkpoint %s (total_limit=%d)", name, configuration.total_limit)
            # Out of sight in one rename, then deleted: nobody lists a half-deleted checkpoint.
            os.makedirs(trash_root, exist_ok=True)
            trash = os.path.join(trash_root, f"{name}.deleting")
            os.replace(os.path.join(base, name), trash)
            shutil.rmtree(trash)
        try:
            os.rmdir(trash_root)
        except OSError:
            pass

    def _log_to_trackers(self) -> None:
        """Log each newly committed checkpoint's numbers to the accelerator's trackers (on the main thread)."""
        while self._unlogged:
            result = self._unlogged.popleft()
            if self._accelerator.trackers:
                self._accelerator.log(result.metrics())

    # -- draining and closing

    def wait(self) -> None:
        """Block until every checkpoint saved so far is committed; raise the first failure not yet seen."""
        self._saver.wait()

    def close(self) -> None:
        """Drain, stop the writer process and give the accelerator its own methods back; idempotent."""
        if not self._open:
            return
        self._open = False
        try:
            self._saver.close()
        finally:
            for name, method in self._originals.items():
                if name in self._overridden:
                    setattr(self._accelerator, name, method)
                else:
                    delattr(self._accelerator, name)  # back to the class's own method

    def __enter__(self) -> AsyncSaveState:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
