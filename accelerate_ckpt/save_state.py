"""An asynchronous `accelerator.save_state()` that writes Accelerate's own files.

save_state() snapshots every object Accelerate would save (models, optimizers, schedulers,
samplers, scaler, RNG states, registered custom objects) into shared memory and returns. The
files, with Accelerate's names and formats, are written by a core writer process into a
hidden staging folder; once every rank's files are durable, the folder is renamed to the
checkpoint's name in one step. `accelerator.load_state()` therefore never sees a partial
checkpoint, and `total_limit` pruning runs only after a newer checkpoint is committed.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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

from core import (
    AsyncCheckpointer,
    CheckpointerConfig,
    CheckpointStagerConfig,
    CheckpointStats,
    CheckpointWriteError,
    CheckpointWriterConfig,
    RankInfo,
    WriteResult,
    WriterHook,
    make_async_checkpointer,
)
from core import drain
from core.file_format import fsync_directory

from .commit import CommitVote

logger = logging.getLogger(__name__)

PENDING_DIR = ".async_ckpt_pending"
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


@dataclass
class _File:
    name: str
    state: Any
    file_format: str = "torch"


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


def _shared_files(accelerator: Accelerator, weights: list[dict], safe_serialization: bool) -> list[_File]:
    """The files one process writes for everyone, named as save_accelerator_state names them."""
    files = []
    weights_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    for i, state in enumerate(weights):
        if safe_serialization:
            files.append(_File(_indexed(weights_name, i), clean_state_dict_for_safetensors(state), "safetensors"))
        else:
            files.append(_File(_indexed(weights_name, i), state))
    for i, optimizer in enumerate(accelerator._optimizers):
        files.append(_File(_indexed(f"{OPTIMIZER_NAME}.bin", i), optimizer.state_dict()))
    for i, scheduler in enumerate(accelerator._schedulers):
        files.append(_File(_indexed(f"{SCHEDULER_NAME}.bin", i), scheduler.state_dict()))
    for i, dataloader in enumerate(accelerator._dataloaders):
        files.extend(_dataloader_files(dataloader, i))
    if accelerator.scaler is not None:
        files.append(_File(SCALER_NAME, accelerator.scaler.state_dict()))
    for i, obj in enumerate(accelerator._custom_objects):
        files.append(_File(f"custom_checkpoint_{i}.pkl", obj.state_dict()))
    return files


def _dataloader_files(dataloader: Any, index: int) -> list[_File]:
    from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler

    files = []
    if isinstance(dataloader.dataset, IterableDatasetShard):
        sampler = dataloader.get_sampler()
        if isinstance(sampler, SeedableRandomSampler):
            files.append(_File(_indexed(f"{SAMPLER_NAME}.bin", index), sampler))
    if getattr(dataloader, "use_stateful_dataloader", False):
        files.append(_File(_indexed("dl_state_dict.bin", index), dataloader.state_dict()))
    return files


@dataclass
class _Timing:
    start: float
    blocking_seconds: float


def _remove_if_empty(directory: str) -> None:
    try:
        os.rmdir(directory)
    except OSError:
        pass  # not empty (another checkpoint is pending) or already gone


class AsyncSaveState:
    """Makes one Accelerator's save_state() asynchronous; see the module docstring.

    While active, `accelerator.save_state`, `load_state` and `end_training` are this
    handle's; `load_state` and `end_training` first wait for every pending checkpoint.
    wait() blocks until all checkpoints saved so far are committed and raises the first
    failure; close() also stops the writer process and restores Accelerate's own methods.
    """

    def __init__(self, accelerator: Accelerator, config: CheckpointerConfig, commit_hook: WriterHook | None) -> None:
        self._accelerator = accelerator
        self._config = config
        self._commit_hook = commit_hook
        self._checkpointer: AsyncCheckpointer | None = None
        self._committer: ThreadPoolExecutor | None = None
        self._commits: list[Future] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._generation = 0
        self.stats = CheckpointStats()
        self._unlogged: list[WriteResult] = []
        self._originals = {name: getattr(accelerator, name) for name in ("save_state", "load_state", "end_training")}
        self._overridden = {name for name in self._originals if name in vars(accelerator)}
        accelerator.save_state = self.save_state
        accelerator.load_state = self._draining(self._originals["load_state"])
        accelerator.end_training = self._draining(self._originals["end_training"], close=True)
        self._open = True
        drain.register(self, drain_on_sigterm=config.process_config.sigterm_drain_secs > 0)

    # -- the replacement methods

    def save_state(self, output_dir: str | None = None, safe_serialization: bool = True, **save_model_func_kwargs: Any) -> Path:
        """Snapshot everything accelerator.save_state() saves and return; the files follow."""
        self._raise_error()
        self._log_to_trackers()
        start = time.perf_counter()
        accelerator = self._accelerator
        final = self._final_dir(output_dir)
        staging = self._staging_dir(final)
        if self._is_committer():
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        accelerator.wait_for_everyone()

        weights = [accelerator.get_state_dict(model, unwrap=False) for model in accelerator._models]
        for hook in accelerator._save_model_state_pre_hook.values():
            hook(accelerator._models, weights, staging)
        files = [_File(f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl", _rng_states(accelerator))]
        if self._is_committer():
            files = _shared_files(accelerator, weights, safe_serialization) + files

        checkpointer = self._ensure_checkpointer(len(files))
        writes = []
        for file in files:
            staged, written = checkpointer.save(
                os.path.join(staging, file.name), file.state, file_format=file.file_format, report_errors=False
            )
            staged.result()
            writes.append(written)
        self._generation += 1
        commit = CommitVote(accelerator.process_index, accelerator.num_processes, final, self._generation,
                            self._config.writer_config.write_barrier_timeout_secs)
        self._submit_commit(writes, commit, staging, final, _Timing(start, time.perf_counter() - start))
        accelerator.project_configuration.iteration += 1
        return Path(final)

    def _draining(self, original: Callable[..., Any], close: bool = False) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if close:
                self._release()
            else:
                self.wait()
            self._log_to_trackers()
            return original(*args, **kwargs)

        call.__doc__ = original.__doc__
        return call

    # -- where files go

    def _final_dir(self, output_dir: str | None) -> str:
        accelerator = self._accelerator
        if accelerator.project_configuration.automatic_checkpoint_naming:
            base = os.path.join(accelerator.project_dir, "checkpoints")
            os.makedirs(base, exist_ok=True)
            final = os.path.join(base, f"checkpoint_{accelerator.save_iteration}")
            if os.path.exists(final):
                raise ValueError(
                    f"Checkpoint directory {final} ({accelerator.save_iteration}) already exists. Please manually "
                    "override `self.save_iteration` with what iteration to start with."
                )
            return final
        if output_dir is None:
            raise ValueError(
                "save_state() needs output_dir unless ProjectConfiguration(automatic_checkpoint_naming=True) is set"
            )
        return os.path.abspath(os.path.expanduser(os.fspath(output_dir)))

    def _staging_dir(self, final: str) -> str:
        """Outside the folder Accelerate lists for its latest checkpoint, on the same filesystem."""
        accelerator = self._accelerator
        if accelerator.project_configuration.automatic_checkpoint_naming:
            root = accelerator.project_dir
        else:
            root = os.path.dirname(final)
        return os.path.join(root, PENDING_DIR, os.path.basename(final))

    def _is_committer(self) -> bool:
        accelerator = self._accelerator
        if accelerator.project_configuration.save_on_each_node:
            return accelerator.is_local_main_process
        return accelerator.is_main_process

    # -- background commit

    def _ensure_checkpointer(self, files_per_checkpoint: int) -> AsyncCheckpointer:
        if self._checkpointer is None:
            staging = self._config.staging_config
            config = CheckpointerConfig(
                writer_config=self._config.writer_config,
                staging_config=CheckpointStagerConfig(
                    use_pinned_memory=staging.use_pinned_memory,
                    # one slab per file, for `max_in_flight` whole checkpoints
                    max_in_flight=staging.max_in_flight * max(files_per_checkpoint, 1),
                ),
                process_config=self._config.process_config,
            )
            self._checkpointer = make_async_checkpointer(config, RankInfo(0, 1), commit_hook=self._commit_hook)
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="async-ckpt-accelerate-commit")
        return self._checkpointer

    def _submit_commit(self, writes: list[Future], vote: CommitVote, staging: str, final: str, timing: "_Timing") -> None:
        assert self._committer is not None
        commit = self._committer.submit(self._commit, writes, vote, staging, final, timing)
        commit.add_done_callback(self._record_error)
        with self._lock:
            self._commits.append(commit)

    def _commit(self, writes: list[Future], vote: CommitVote, staging: str, final: str, timing: "_Timing") -> None:
        errors = [f.exception() for f in writes]  # every file finished, not just up to the first failure
        failure = next((e for e in errors if e is not None), None)
        all_ok = vote.cast(failure is None)
        if self._is_committer():
            if all_ok:
                self._publish(staging, final)
            else:
                shutil.rmtree(staging, ignore_errors=True)
            _remove_if_empty(os.path.dirname(staging))
        vote.wait_published(all_ok)
        if failure is not None:
            raise failure
        if not all_ok:
            raise CheckpointWriteError(f"checkpoint {final} was not committed: another rank failed to write its files")
        written = [f.result() for f in writes]
        result = WriteResult(
            path=final,
            files=tuple(os.path.join(final, os.path.basename(w.path)) for w in written),
            nbytes=sum(w.nbytes for w in written),
            write_seconds=max(w.write_seconds for w in written),
            blocking_seconds=timing.blocking_seconds,
            persist_seconds=time.perf_counter() - timing.start,
        )
        with self._lock:
            self.stats.record(result)
            self._unlogged.append(result)
        logger.info(
            "checkpoint %s committed: blocked %.3f s, %.1f MB durable after %.3f s",
            final, result.blocking_seconds, result.nbytes / 1e6, result.persist_seconds,
        )

    def _log_to_trackers(self) -> None:
        """Log each newly committed checkpoint's numbers to the accelerator's trackers (on the main thread)."""
        with self._lock:
            results, self._unlogged = self._unlogged, []
        if self._accelerator.trackers:
            for result in results:
                self._accelerator.log(result.metrics())

    def _publish(self, staging: str, final: str) -> None:
        replaced = None
        if os.path.exists(final):
            replaced = f"{staging}.replaced"
            os.replace(final, replaced)
        os.replace(staging, final)
        fsync_directory(os.path.dirname(final))
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._prune(final)

    def _prune(self, final: str) -> None:
        configuration = self._accelerator.project_configuration
        if not configuration.automatic_checkpoint_naming or configuration.total_limit is None:
            return
        base = os.path.dirname(final)
        numbered = [(int(m.group(1)), name) for name in os.listdir(base) if (m := re.fullmatch(r"checkpoint_(\d+)", name))]
        numbered.sort()
        trash_root = os.path.dirname(self._staging_dir(final))
        for _, name in numbered[: max(len(numbered) - configuration.total_limit, 0)]:
            logger.info("deleting checkpoint %s (total_limit=%d)", name, configuration.total_limit)
            # Out of sight in one rename, then deleted: nobody lists a half-deleted checkpoint.
            os.makedirs(trash_root, exist_ok=True)
            trash = os.path.join(trash_root, f"{name}.deleting")
            os.replace(os.path.join(base, name), trash)
            shutil.rmtree(trash)

    # -- errors, draining, closing

    def _record_error(self, commit: Future) -> None:
        with self._lock:
            self._commits.remove(commit)
            if commit.exception() is not None and self._error is None:
                self._error = commit.exception()

    def _raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def wait(self) -> None:
        """Block until every checkpoint saved so far is committed; raise the first failure."""
        with self._lock:
            commits = list(self._commits)
        for commit in commits:
            commit.exception()
        self._raise_error()

    def drain_for_signal(self) -> None:
        """Wait up to sigterm_drain_secs for pending commits; called from the SIGTERM handler."""
        pending = list(self._commits)
        if pending:
            wait_futures(pending, timeout=self._config.process_config.sigterm_drain_secs)

    def _release(self) -> None:
        """Drain, then stop the writer process; the next save starts a new one."""
        try:
            self.wait()
        finally:
            checkpointer, self._checkpointer = self._checkpointer, None
            committer, self._committer = self._committer, None
            if committer is not None:
                committer.shutdown(wait=True)
            if checkpointer is not None:
                checkpointer.close()

    def close(self) -> None:
        """Drain, stop the writer process and give the accelerator its own methods back; idempotent."""
        if not self._open:
            return
        self._open = False
        drain.unregister(self)
        try:
            self._release()
        finally:
            for name, method in self._originals.items():
                if name in self._overridden:
                    setattr(self._accelerator, name, method)
                else:
                    delattr(self._accelerator, name)  # back to the class's own method

    def __enter__(self) -> "AsyncSaveState":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
