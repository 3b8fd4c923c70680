"""AsyncCheckpointIO: Lightning checkpoints that cost the training loop only a snapshot."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback

from core import (
    AsyncCheckpointer,
    CheckpointerConfig,
    CheckpointReader,
    CheckpointStagerConfig,
    CheckpointStats,
    CheckpointWriterConfig,
    RankInfo,
    WriterHook,
    make_async_checkpointer,
)

logger = logging.getLogger(__name__)


class _AsyncCheckpointCallback(Callback):
    """Makes every checkpoint issued before an epoch ends durable before the next epoch starts,
    and logs each committed checkpoint's numbers through the LightningModule's log_dict.

    A plain callback's epoch-end hook runs before ModelCheckpoint's (Lightning runs checkpoint
    callbacks last), so the checkpoint ModelCheckpoint saves at this epoch end may still be
    writing while the next epoch runs.
    """

    def __init__(self, plugin: "AsyncCheckpointIO") -> None:
        self.plugin = plugin
        self._logged: tuple[Any, int] = (None, 0)  # (stats object, saves already logged)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.plugin.wait()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        stats = self.plugin.stats
        if stats is None or stats.last is None:
            return
        logged_stats, logged_saves = self._logged
        if stats is not logged_stats or stats.saves > logged_saves:
            pl_module.log_dict(stats.last.metrics(), on_step=True, on_epoch=False)
            self._logged = (stats, stats.saves)


class AsyncCheckpointIO(CheckpointIO):
    """A Lightning CheckpointIO that snapshots in save_checkpoint and writes in a background process.

    Use it as ``Trainer(plugins=[AsyncCheckpointIO()])``. Each checkpoint file appears at exactly
    the path Lightning gives, atomically, and is a plain torch.load / load_from_checkpoint file.

    Args:
        max_in_flight: how many checkpoints may be staged or writing at once (each holds a host
            copy of the checkpoint); a further save waits for the oldest. The default, 2, lets
            ModelCheckpoint save a top-k file and last.ckpt in the same step without waiting.
        pin_memory: stage into pinned memory for fast GPU copies (None: when CUDA is available).
        checksums: store checksums so that loads verify the bytes.
        use_direct_io: write with O_DIRECT where the filesystem supports it.
        io_threads: parallel writes per checkpoint (0: chosen from the CPU count).
        config: a full CheckpointerConfig instead of the options above.
        commit_hook: a picklable WriterHook run in the writer process around each commit.

    Guarantees: save_checkpoint returns once the snapshot is taken; load_checkpoint and
    remove_checkpoint first wait for pending writes to that path; writes issued before an
    epoch ends are durable before the next epoch begins (a callback attached on the first
    save does this); teardown drains and the next fit starts afresh; interpreter exit drains
    too. A failed write is raised by the next save, the epoch-end drain or teardown.
    """

    def __init__(
        self,
        max_in_flight: int = 2,
        pin_memory: bool | None = None,
        checksums: bool = True,
        use_direct_io: bool = True,
        io_threads: int = 0,
        config: CheckpointerConfig | None = None,
        commit_hook: WriterHook | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            for name, value in (("checksums", checksums), ("use_direct_io", use_direct_io)):
                if not isinstance(value, bool):
                    raise TypeError(f"AsyncCheckpointIO({name}=...) must be True or False, got {value!r}")
            config = CheckpointerConfig(
                writer_config=CheckpointWriterConfig(
                    checksums=checksums, use_direct_io=use_direct_io, io_threads=io_threads
                ),
                staging_config=CheckpointStagerConfig(max_in_flight=max_in_flight, use_pinned_memory=pin_memory),
            )
        # The plugin writes exactly the path Lightning gives; the caller's config is left as it was.
        self._config = dataclasses.replace(config, writer_config=dataclasses.replace(config.writer_config, layout="file"))
        self._commit_hook = commit_hook
        self._checkpointer: AsyncCheckpointer | None = None
        self._reader = CheckpointReader(RankInfo(0, 1))
        self._drain_callback = _AsyncCheckpointCallback(self)
        self._last_fit_stats: CheckpointStats | None = None

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
        # Now, not in the writer: ModelCheckpoint links last.ckpt into this directory right away.
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._attach_drain_callback()
        staged, _written = self.checkpointer.save(path, checkpoint, step=checkpoint.get("global_step"))
        staged.result()

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        if self._checkpointer is not None:
            self._checkpointer.wait_for_path(os.fspath(path))
        if weights_only is None:  # torch.load's default, as with Lightning's TorchCheckpointIO
            weights_only = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() not in ("1", "true", "yes")
        loaded, _missing = self._reader.read(path, map_location=map_location, weights_only=weights_only, **kwargs)
        return loaded

    def remove_checkpoint(self, path: _PATH) -> None:
        path = os.fspath(path)
        if self._checkpointer is not None:
            self._checkpointer.wait_for_path(path)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            logger.debug("remove_checkpoint: %s is already gone", path)

    @property
    def stats(self) -> CheckpointStats | None:
        """Totals of this fit's committed checkpoints and the last one's numbers (None before the first save).

        The plugin also logs the last one's `WriteResult.metrics()` (checkpoint/blocking_s,
        checkpoint/persist_s, ...) with the LightningModule's log_dict at the next batch end.
        """
        return self._last_fit_stats if self._checkpointer is None else self._checkpointer.stats

    def wait(self) -> None:
        """Block until every checkpoint issued so far is durable; raise the first write error."""
        if self._checkpointer is not None:
            self._checkpointer.wait()

    def teardown(self) -> None:
        """Drain every write, stop the writer process and free staging memory; raise a write error."""
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            self._last_fit_stats = checkpointer.stats
            checkpointer.close()

    def _attach_drain_callback(self) -> None:
        trainer = _calling_trainer()
        if trainer is not None and self._drain_callback not in trainer.callbacks:
            # Before every ModelCheckpoint, whose epoch-end saves must not be drained too.
            trainer.callbacks.insert(0, self._drain_callback)

    def __getstate__(self) -> dict[str, Any]:
        # Strategies may deep-copy or pickle plugins (e.g. for spawn); a running writer stays behind.
        state = self.__dict__.copy()
        state["_checkpointer"] = None
        return state


def _calling_trainer() -> Any:
    """The Trainer whose strategy is calling save_checkpoint, found on the call stack.

    A CheckpointIO is never handed its Trainer; this is how the plugin attaches its epoch-end
    drain without the user adding a callback. None when called outside a Trainer.
    """
    from lightning.pytorch.strategies import Strategy

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Strategy):
            module = candidate.lightning_module
            return module.trainer if module is not None and module._trainer is not None else None
        frame = frame.f_back
    return None
