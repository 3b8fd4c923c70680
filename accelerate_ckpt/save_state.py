"""An asynchronous `accelerator.save_state()` that writes Accelerate's own files.

save_state() snapshots every object Accelerate would save (models, optimizers, schedulers,
samplers, scaler, RNG states, registered custom objects) and returns. As Accelerate does, it
creates the checkpoint folder at once; the files, with Accelerate's names and formats, are
written in the background into a hidden staging folder inside it (one per process) and
published into it once every rank's files are durable (FileSetCheckpointer): only this
save's files are added or replaced. `total_limit` pruning runs after a newer checkpoint is
published and keeps every checkpoint still being written; a save that the writer has not
started when total_limit newer ones were saved is skipped (pruning would delete it).
`load_state()` and `end_training()` first wait for pending checkpoints (of any Accelerator of
the process), and so do `save_model()` and `save()` into a folder a checkpoint is being
written to. `load_state()` refuses a folder whose save died before publishing its files (and,
searching for the newest checkpoint, skips it). Deleting a checkpoint's folder while it is
written cancels that save.
"""

from __future__ import annotations

import collections
import functools
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

from core import (
    CheckpointerConfig,
    UncommittedCheckpointError,
    WriteResult,
    WriterHook,
    pending_writes,
    prestart_writer,
    wait_for_pending_writes,
)
from core.leftovers import PENDING_DIR, PUBLISHING_SUFFIX, TRASH_PREFIX, owner_alive, owner_token
from core.leftovers import sweep as sweep_leftovers

from . import accelerate_internals as internals
from .file_set import FileSetCheckpointer, NamedState, remove_if_empty
from .publish import interrupted_publish

logger = logging.getLogger(__name__)

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


def _being_written(folder: str) -> bool:
    """Whether a save into `folder` is pending in this process or runs in another (a live owner,
    or one on another machine whose life cannot be seen)."""
    if pending_writes(folder):
        return True
    try:
        names = os.listdir(os.path.join(folder, PENDING_DIR))
    except OSError:
        return False
    return any(owner_alive(name) is not False for name in names if not name.endswith(PUBLISHING_SUFFIX))


def _incomplete(folder: str) -> str | None:
    """Why the checkpoint folder cannot be restored because a save into it did not finish, or None.

    A save whose process died halfway through publishing left a mix of two saves' files; one
    that died before publishing left nothing of its own, which is harmless where an older
    checkpoint is in the folder and means it is incomplete where none is."""
    pending = os.path.join(folder, PENDING_DIR)
    mixed = interrupted_publish(pending)
    if mixed is not None:
        return (
            "the process that was publishing its files died halfway, so it mixes two saves "
            f"(marker {mixed}); load an earlier checkpoint, or save into it again"
        )
    try:
        leftovers = [n for n in os.listdir(pending) if owner_alive(n) is False]
    except OSError:
        return None
    if leftovers and not any(name.startswith(_ACCELERATE_FILES) for name in os.listdir(folder)):
        return (
            "the save that was writing it died before publishing its files (leftovers in "
            f"{pending}); load an earlier checkpoint"
        )
    return None


_ACCELERATE_FILES = ("model", "pytorch_model", RNG_STATE_NAME, OPTIMIZER_NAME)


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


def _shared_files(
    accelerator: Accelerator, weights: list[dict[str, Any]], safe_serialization: bool
) -> list[NamedState]:
    """The files one process writes for everyone, named as save_accelerator_state names them."""
    files = []
    weights_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    for i, state in enumerate(weights):
        if safe_serialization:
            files.append(
                NamedState(_indexed(weights_name, i), internals.clean_state_dict_for_safetensors(state), "safetensors")
            )
        else:
            files.append(NamedState(_indexed(weights_name, i), state))
    for i, optimizer in enumerate(internals.optimizers(accelerator)):
        files.append(NamedState(_indexed(f"{OPTIMIZER_NAME}.bin", i), optimizer.state_dict()))
    for i, scheduler in enumerate(internals.schedulers(accelerator)):
        files.append(NamedState(_indexed(f"{SCHEDULER_NAME}.bin", i), scheduler.state_dict()))
    for i, dataloader in enumerate(internals.dataloaders(accelerator)):
        files.extend(_dataloader_files(dataloader, i))
    if accelerator.scaler is not None:
        files.append(NamedState(SCALER_NAME, accelerator.scaler.state_dict()))
    for i, obj in enumerate(internals.custom_objects(accelerator)):
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


_HOOKED = ("save_state", "load_state", "end_training", "save_model", "save")


class _HookedMethod:
    """What stands in for one of the accelerator's methods while the hook is on."""

    def __init__(self, function: Callable[..., Any], doc: str | None) -> None:
        self._function = function
        self.__doc__ = doc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)


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
        if accelerator.is_main_process:  # the writer is ready when the first save_state comes
            prestart_writer(config.process_config.writer_niceness)
        self._unlogged: collections.deque[WriteResult] = collections.deque()
        self._saver.on_committed.append(self._unlogged.append)
        self._originals = {name: getattr(accelerator, name) for name in _HOOKED}
        self._overridden = {name for name in self._originals if name in vars(accelerator)}
        # Pickling (and deepcopy) asks the instance for __getstate__: while the hook is on, the
        # accelerator's own answer leaves the hook out, so a copy has Accelerate's methods.
        accelerator.__getstate__ = _HookedMethod(self._state_without_hook, None)
        accelerator.save_state = _HookedMethod(self.save_state, self._originals["save_state"].__doc__)
        accelerator.load_state = _HookedMethod(self._load_state, self._originals["load_state"].__doc__)
        accelerator.end_training = _HookedMethod(self._end_training, self._originals["end_training"].__doc__)
        accelerator.save_model = _HookedMethod(self._save_model, self._originals["save_model"].__doc__)
        accelerator.save = _HookedMethod(self._save, self._originals["save"].__doc__)
        self._open = True

    def _state_without_hook(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self._accelerator).items() if not isinstance(v, _HookedMethod)}

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
        accelerator.wait_for_everyone()
        made_final = not os.path.lexists(final)
        try:
            os.makedirs(final, exist_ok=True)  # as Accelerate does, before writing anything
            sweep_leftovers(final)  # what a save into this folder that died left
            prune = self._prune if accelerator.is_main_process else None
            files_in = functools.partial(self._files_in, safe_serialization=safe_serialization)
            self._saver.save(final, files_in, staging=self._staging_dir(final), publishes=True, after_publish=prune)
        except BaseException:
            # (A Ctrl-C, say.) A save under way still completes: count it, as a returned one. One
            # that is not leaves nothing behind, not even the folder, so it can be saved again.
            if pending_writes(final):
                accelerator.project_configuration.iteration += 1
            elif made_final:
                remove_if_empty(final)
            raise
        accelerator.project_configuration.iteration += 1
        self._skip_what_pruning_deletes()
        return returned

    def _skip_what_pruning_deletes(self) -> None:
        """With automatic naming and total_limit, a save older than the newest total_limit is
        deleted once they are written: a writer that fell behind skips it instead of writing it
        (said once). The newest complete checkpoint stays until total_limit newer ones are."""
        configuration = self._accelerator.project_configuration
        if not configuration.automatic_checkpoint_naming or configuration.total_limit is None:
            return
        limit = configuration.total_limit
        self._saver.cancel_all_but_newest(
            limit,
            why=f"{limit} newer checkpoints were saved before the writer reached it: total_limit={limit} deletes it",
        )

    def _files_in(self, staging: str, safe_serialization: bool) -> list[NamedState]:
        """What save_state saves (the pre-hooks write their own files into `staging`)."""
        accelerator = self._accelerator
        models = internals.models(accelerator)
        weights = [accelerator.get_state_dict(model, unwrap=False) for model in models]
        for hook in internals.save_model_state_pre_hooks(accelerator):
            hook(models, weights, staging)  # files it writes there are published with the rest
        files = [NamedState(f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl", _rng_states(accelerator))]
        if self._writes_shared_files():
            files = _shared_files(accelerator, weights, safe_serialization) + files
        return files

    def _load_state(self, input_dir: str | None = None, *args: Any, **kwargs: Any) -> Any:
        accelerator = self._accelerator
        if input_dir is not None:
            input_dir = os.path.expanduser(os.fspath(input_dir))
            wait_for_pending_writes(input_dir)
        elif accelerator.project_configuration.automatic_checkpoint_naming:
            wait_for_pending_writes(self._checkpoints_dir())
            input_dir = self._newest_complete()
        self._saver.wait()
        self._log_to_trackers()
        if input_dir is not None:
            problem = _incomplete(input_dir)
            if problem is not None:
                raise UncommittedCheckpointError(f"checkpoint {input_dir} is incomplete: {problem}")
        return self._originals["load_state"](input_dir, *args, **kwargs)

    def _save_model(self, model: Any, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        """Accelerate's save_model, once a checkpoint being written into that folder is published
        (else the checkpoint's older weights would replace the ones saved here)."""
        wait_for_pending_writes(os.path.expanduser(os.fspath(save_directory)))
        return self._originals["save_model"](model, save_directory, *args, **kwargs)

    def _save(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        """Accelerate's save, once a checkpoint being written to that path is published."""
        if isinstance(f, (str, os.PathLike)):
            wait_for_pending_writes(os.path.expanduser(os.fspath(f)))
        return self._originals["save"](obj, f, *args, **kwargs)

    def _end_training(self, *args: Any, **kwargs: Any) -> Any:
        self._saver.release()
        self._log_to_trackers()
        return self._originals["end_training"](*args, **kwargs)

    # -- where files go

    def _checkpoints_dir(self) -> str:
        return os.path.join(self._accelerator.project_dir, "checkpoints")

    def _final_dir(self, output_dir: str | os.PathLike[str] | None) -> tuple[str, Path]:
        """(where the checkpoint goes, what save_state returns for it)."""
        accelerator = self._accelerator
        configuration = accelerator.project_configuration
        if configuration.automatic_checkpoint_naming:
            base = self._checkpoints_dir()
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
        """This process's private folder for the save's files, inside the checkpoint folder (so
        nothing is created outside the folder the checkpoint goes to), named after the process:
        if it dies, the next save into that folder removes it, and load_state() sees why the
        folder is incomplete."""
        name = f"{owner_token()}-save_{self._accelerator.save_iteration}"
        return os.path.join(final, PENDING_DIR, name)

    def _writes_shared_files(self) -> bool:
        """Whether this process writes the files one process writes for all (models, optimizers...)."""
        accelerator = self._accelerator
        if accelerator.project_configuration.save_on_each_node:
            return bool(accelerator.is_local_main_process)
        return bool(accelerator.is_main_process)

    def _numbered(self) -> list[tuple[int, str]]:
        base = self._checkpoints_dir()
        return sorted(
            (int(m.group(1)), os.path.join(base, name))
            for name in os.listdir(base)
            if (m := _CHECKPOINT_NAME.fullmatch(name))
        )

    def _newest_complete(self) -> str | None:
        """The newest checkpoint folder that load_state() can restore; incomplete ones are skipped
        with the reason (None when there is no folder at all: Accelerate then says so)."""
        numbered = self._numbered()
        for _, folder in reversed(numbered):
            problem = _incomplete(folder)
            if problem is None:
                return folder
            logger.warning("load_state(): skipping %s: %s", folder, problem)
        if numbered:
            raise UncommittedCheckpointError(
                f"no complete checkpoint in {self._checkpoints_dir()}: every one was interrupted before its files "
                "were published"
            )
        return None

    def _prune(self, final: str) -> None:
        """total_limit, applied after a newer checkpoint is published: the newest total_limit
        complete checkpoints stay, and so does every one still being written; an interrupted one
        is deleted once newer complete ones exist. Each deletion is one rename out of sight."""
        configuration = self._accelerator.project_configuration
        if not configuration.automatic_checkpoint_naming or configuration.total_limit is None:
            return
        base = self._checkpoints_dir()
        sweep_leftovers(base)  # trash of a pruning that died
        complete, doomed = 0, []
        for _, folder in reversed(self._numbered()):
            if folder != final and _being_written(folder):  # `final` was just published: complete
                continue
            if _incomplete(folder) is None:
                complete += 1
                if complete <= configuration.total_limit:
                    continue
            elif complete == 0:
                continue  # no complete checkpoint is newer: keep it for whoever looks into it
            doomed.append(folder)
        for folder in doomed:
            logger.info("deleting checkpoint %s (total_limit=%d)", folder, configuration.total_limit)
            trash = os.path.join(base, f"{TRASH_PREFIX}{owner_token()}.{os.path.basename(folder)}")
            try:
                os.replace(folder, trash)
            except FileNotFoundError:
                continue  # deleted meanwhile, by someone else
            shutil.rmtree(trash)

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
            del self._accelerator.__getstate__

    def __enter__(self) -> AsyncSaveState:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
