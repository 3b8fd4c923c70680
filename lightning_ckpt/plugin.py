"""AsyncCheckpointIO: Lightning checkpoints that cost the training loop only a snapshot."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
import weakref
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback

from core import (
    AsyncCheckpointer,
    AsyncOptions,
    CheckpointerConfig,
    CheckpointReader,
    CheckpointStats,
    CheckpointWriter,
    RankInfo,
    WriterHook,
    make_async_checkpointer,
    pending_writes,
    prestart_writer,
    wait_for_pending_writes,
)

from .lightning_internals import (
    METADATA_FILE,
    ShardedCheckpointIO,
    logging_step,
    route_model_parallel_checkpoints,
    trainer_of,
)
from .removals import removals, remove_now

logger = logging.getLogger(__name__)


class _AsyncCheckpointCallback(Callback):
    """Makes every checkpoint of an epoch durable before the next epoch's first step, and logs
    each committed checkpoint's numbers to the Trainer's loggers.

    The drain runs in on_train_epoch_start, which Lightning calls on callbacks before the
    LightningModule's own hook: so the checkpoint ModelCheckpoint saved in the previous epoch's
    end hook (checkpoint callbacks run last there) is on disk when the new epoch begins, and its
    write overlapped whatever ran between the epochs.

    The numbers go to each logger's `log_metrics` as LearningRateMonitor sends its own, not
    through the LightningModule's `log_dict`, whose bookkeeping cost a checkpoint every step about
    4 ms per step even with no logger.
    """

    def __init__(self, plugin: AsyncCheckpointIO) -> None:
        self.plugin = plugin
        self._logged: tuple[Any, int] = (None, 0)  # (stats object, saves already logged)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.plugin.wait()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        stats = self.plugin.stats
        if stats is None or stats.last is None or not trainer.loggers:
            return
        logged_stats, logged_saves = self._logged
        if stats is not logged_stats or stats.saves > logged_saves:
            metrics, step = stats.last.metrics(), logging_step(trainer)
            for each in trainer.loggers:
                each.log_metrics(metrics, step=step)
            self._logged = (stats, stats.saves)


def _launched_as_global_rank_zero() -> bool:
    """Whether this process is global rank 0 as far as the launcher's environment tells yet
    (a DDP strategy sets up its process group later; its launchers set these for other ranks)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class AsyncCheckpointIO(CheckpointIO, ShardedCheckpointIO):
    """A Lightning CheckpointIO that snapshots in save_checkpoint and writes in a background process.

    Use it as ``Trainer(plugins=[AsyncCheckpointIO()])``. Each checkpoint file appears at exactly
    the path Lightning gives, atomically, and is a plain torch.load / load_from_checkpoint file.

    Args:
        options: core.AsyncOptions, or its fields by name (`AsyncCheckpointIO(max_in_flight=3)`):
            max_in_flight (default 2: ModelCheckpoint saves a top-k file and last.ckpt in one
            step without waiting), pin_memory, checksums, use_direct_io, io_threads, incremental.
        config: a full CheckpointerConfig instead of the options.
        commit_hook: a picklable WriterHook run in the writer process around each commit.
        share_repeated_saves: a save of the state the previous save of the same global step held
            (ModelCheckpoint's last.ckpt after its top-k file) copies and writes nothing: its file
            shares the first one's extents (XFS, btrfs) or is a hard link to it (ext4 and most
            others). Hard-linked names are one file: a tool that rewrites one of them in place
            (rather than replacing it, as Lightning and this plugin do) changes both. False writes
            every save on its own.

    With ModelParallelStrategy (FSDP2, tensor parallelism), whose sharded checkpoints Lightning
    never hands to a CheckpointIO, the plugin takes them over (see lightning_internals.py): every
    rank snapshots and writes only its own shards, asynchronously, into a directory in DCP's
    format with Lightning's meta.pt committed with it; `fit(ckpt_path=...)` resumes from it with
    any number of devices, and Lightning's own loader (DCP) reads it too.

    Guarantees: a save while `fit` trains returns once the snapshot is taken; any other save
    (after `fit`, in `validate`/`test`, or from a Trainer that is not fitting) is durable before
    save_checkpoint returns, so the barrier Lightning runs after it, and every reader, finds the
    file. load_checkpoint first waits for pending writes to that path, from any plugin of the
    process; remove_checkpoint does not wait: a pending write to that path is skipped if it has
    not started, and the file is removed once the write is over (wait() waits for that too).
    Every checkpoint of an epoch, the one ModelCheckpoint saves in
    its epoch-end hook included, is durable before the next epoch's first step (a callback
    attached on the first save of a fit does this, and leaves at teardown).
    teardown drains and the next fit starts afresh; interpreter exit drains too. A failed write
    is raised by the next save, the next epoch's drain or teardown. With Fabric, saves are
    asynchronous (call wait() or teardown() before reading them with other tools); a direct
    call, without a Trainer or Fabric, is durable when it returns.
    """

    def __init__(
        self,
        options: AsyncOptions | None = None,
        *,
        config: CheckpointerConfig | None = None,
        commit_hook: WriterHook | None = None,
        share_repeated_saves: bool = True,
        **option_fields: Any,
    ) -> None:
        super().__init__()
        self._config = dataclasses.replace(options or AsyncOptions(), **option_fields).config(config)
        self._commit_hook = commit_hook
        self._share_repeated_saves = share_repeated_saves
        self._checkpointer: AsyncCheckpointer | None = None
        self._sharded: AsyncCheckpointer | None = None  # every rank's, for ModelParallelStrategy
        self._reader = CheckpointReader(RankInfo(0, 1))
        self._drain_callback = _AsyncCheckpointCallback(self)
        self._attached_to: list[weakref.ref[Any]] = []
        self._last_fit_stats: CheckpointStats | None = None
        route_model_parallel_checkpoints(_sharded_handler)
        if _launched_as_global_rank_zero():  # the rank that writes under DDP
            prestart_writer(self._config.process_config.writer_niceness)

    @property
    def checkpointer(self) -> AsyncCheckpointer:
        """The core checkpointer, started on first use and again after teardown."""
        if self._checkpointer is None:
            # Lightning's strategies call save_checkpoint on global rank 0 only: one writer, one file.
            self._checkpointer = make_async_checkpointer(
                self._config, rank_info=RankInfo(0, 1), commit_hook=self._commit_hook
            )
        return self._checkpointer

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "AsyncCheckpointIO.save_checkpoint does not take storage_options; "
                "set its options when constructing AsyncCheckpointIO(...)"
            )
        path = os.fspath(path)
        if "://" in path:
            raise ValueError(
                f"AsyncCheckpointIO writes to local or mounted filesystems; {path!r} is a remote URL. "
                "Use Lightning's TorchCheckpointIO for remote storage"
            )
        # Now, not in the writer: ModelCheckpoint links last.ckpt into this directory right away. The
        # folder as spelled, as Lightning's saver makes it: `sub/../b.ckpt` needs `sub/`.
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        removals.saving(path)
        caller = _caller()
        step = checkpoint.get("global_step")
        if isinstance(caller, _Fitting):
            self._attach_drain_callback(caller.trainer)
        elif caller is None:
            self._save_now(path, checkpoint, step)
            return
        dedupe_key = step if self._share_repeated_saves else None
        staged, _written = self.checkpointer.save(path, checkpoint, step=step, dedupe_key=dedupe_key)
        staged.result()

    def save_sharded(self, strategy: Any, checkpoint: dict[str, Any], path: str) -> None:
        """ModelParallelStrategy's checkpoint, on every rank: the model's and optimizers' sharded
        state dicts as this rank's part of a sharded checkpoint, the rest as Lightning's meta.pt
        (rank 0's), committed with it. Asynchronous while fitting, durable on return otherwise."""
        if os.path.isfile(path):
            raise FileExistsError(
                f"{path} is a file (a full checkpoint), and a sharded checkpoint is a directory; async-ckpt does not "
                "delete files it did not write (Lightning would): remove it or save under another name"
            )
        removals.saving(path)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        extra = {METADATA_FILE: _torch_saved(checkpoint)} if strategy.global_rank == 0 else None
        if self._sharded is None:  # every rank writes: a directory, whatever layout single files use
            writer_config = dataclasses.replace(self._config.writer_config, layout="directory")
            config = dataclasses.replace(self._config, writer_config=writer_config)
            self._sharded = make_async_checkpointer(config, commit_hook=self._commit_hook)
        staged, written = self._sharded.save(path, state, extra_files=extra, step=checkpoint.get("global_step"))
        staged.result()
        caller = _fitting_trainer(strategy)
        if caller is None:
            written.result()
        else:
            self._attach_drain_callback(caller)

    def before_sharded_load(self, strategy: Any, path: str) -> None:
        wait_for_pending_writes(path)

    def _save_now(self, path: str, checkpoint: dict[str, Any], step: Any) -> None:
        """Nothing trains meanwhile: write in this thread, durable before returning (no writer process)."""
        wait_for_pending_writes(path)  # an earlier asynchronous save to the same path lands first
        writer = CheckpointWriter(self._config.writer_config, RankInfo(0, 1), commit_hook=self._commit_hook)
        try:
            writer.write(path, checkpoint, step=step)
        finally:
            writer.close()

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        wait_for_pending_writes(path)
        if weights_only is None:  # torch.load's default, as with Lightning's TorchCheckpointIO
            weights_only = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() not in ("1", "true", "yes")
        loaded: dict[str, Any]
        loaded, _missing = self._reader.read(
            os.fspath(path), map_location=map_location, weights_only=weights_only, **kwargs
        )
        if isinstance(_caller(), _Fitting):  # resuming a fit: its saves will have this checkpoint's shape
            self.checkpointer.prepare(loaded)
        return loaded

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove a checkpoint; one whose write is still pending is removed once that write is
        over (skipped by the writer if it has not started), without waiting (see removals.py)."""
        path = os.fspath(path)
        writes = pending_writes(path)
        if writes:
            for checkpointer in (self._checkpointer, self._sharded):
                if checkpointer is not None:
                    checkpointer.cancel(path)
            removals.remove_after(path, writes)
            return
        wait_for_pending_writes(path)  # (another process's)
        # Freeing in the background spares a training loop; outside one (ddp_spawn's main process
        # removing its hand-over file after the fit) the call frees it, leaving no thread behind.
        remove_now(path, free_in_background=_caller() is not None)

    @property
    def writer_pid(self) -> int | None:
        """The writer process's pid while one runs for this plugin (None: none was started)."""
        checkpointer = self._checkpointer or self._sharded
        return None if checkpointer is None else checkpointer.writer_pid

    @property
    def stats(self) -> CheckpointStats | None:
        """Totals of this fit's committed checkpoints and the last one's numbers (None before the first save).

        The plugin also logs the last one's `WriteResult.metrics()` (checkpoint/blocking_s,
        checkpoint/persist_s, ...) to the Trainer's loggers at the next batch end.
        """
        checkpointer = self._checkpointer or self._sharded
        return self._last_fit_stats if checkpointer is None else checkpointer.stats

    def wait(self) -> None:
        """Block until every checkpoint issued so far is durable; raise the first write error."""
        for checkpointer in (self._checkpointer, self._sharded):
            if checkpointer is not None:
                checkpointer.wait()
        removals.wait()

    def teardown(self) -> None:
        """Drain every write, stop the writer process and free staging memory; raise a write error.
        The drain callback leaves the Trainer's callbacks, as they were before the fit."""
        checkpointers = [c for c in (self._checkpointer, self._sharded) if c is not None]
        self._checkpointer = self._sharded = None
        trainers, self._attached_to = self._attached_to, []
        for reference in trainers:
            trainer = reference()
            if trainer is not None:
                trainer.callbacks = [c for c in trainer.callbacks if c is not self._drain_callback]
        for checkpointer in checkpointers:
            self._last_fit_stats = checkpointer.stats
        try:
            for checkpointer in checkpointers[:-1]:
                checkpointer.close()
        finally:
            if checkpointers:
                checkpointers[-1].close()
            removals.wait()

    def _attach_drain_callback(self, trainer: Any) -> None:
        if self._drain_callback not in trainer.callbacks:
            # First: its epoch-start drain runs before any other callback looks at the checkpoints. A
            # new list: Lightning may be iterating the current one (a save from a callback's hook).
            trainer.callbacks = [self._drain_callback, *trainer.callbacks]
            self._attached_to.append(weakref.ref(trainer))

    def __getstate__(self) -> dict[str, Any]:
        # Strategies may deep-copy or pickle plugins (e.g. for spawn); a running writer stays behind.
        state = self.__dict__.copy()
        state["_checkpointer"] = state["_sharded"] = None
        state["_attached_to"] = []
        return state


class _Fitting:
    """A save from a Trainer's running training loop (it may overlap training)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer


class _FabricLoop:
    """A save through Fabric: from the user's own training loop, which Fabric cannot see."""


def _sharded_handler(strategy: Any) -> ShardedCheckpointIO | None:
    plugin = strategy.checkpoint_io
    return plugin if isinstance(plugin, AsyncCheckpointIO) else None


def _torch_saved(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _fitting_trainer(strategy: Any) -> Any:
    """The Trainer whose running fit this strategy serves, or None (not fitting, or no Trainer)."""
    from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

    module = strategy.lightning_module
    trainer = trainer_of(module) if module is not None else None
    if trainer is not None and trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING:
        return trainer
    return None


def _caller() -> _Fitting | _FabricLoop | None:
    """Who is saving, found on the call stack (a CheckpointIO is never handed its Trainer):
    a fitting Trainer, Fabric, or (None) anything else: a Trainer that is not training, a
    direct call, another plugin's background thread. Only the first two save asynchronously."""
    from lightning.fabric.strategies.strategy import Strategy as FabricStrategy
    from lightning.pytorch.strategies import Strategy

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Strategy):
            trainer = _fitting_trainer(candidate)
            return None if trainer is None else _Fitting(trainer)
        if isinstance(candidate, FabricStrategy):
            return _FabricLoop()
        frame = frame.f_back  # type: ignore[assignment]
    return None
