"""Configuration dataclasses; every default works on the machine it runs on (CPU or CUDA)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .fsutil import DEFAULT_CHUNK_BYTES

logger = logging.getLogger(__name__)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class CheckpointStagerConfig:
    """How tensors are snapshotted into host memory. None means "when this machine has CUDA".

    use_pinned_memory: pin the staging memory for fast device-to-host copies. Asked for on a
        machine without CUDA, it is ignored with a warning (as torch's own stager does).
    use_shared_memory: accepted for compatibility with torch's _experimental config. Staging
        memory is always shared with the writer process (an anonymous memory file), so False
        changes nothing.
    use_async_staging: stage() returns a future that completes when the copies have, instead of
        the staged state dict itself; CUDA copies then overlap the caller's work.
    use_non_blocking_copy: CUDA copies on a side stream. Asked for (True) on a machine without
        an accelerator, DefaultStager raises CheckpointConfigError (an AssertionError, as in torch).
    max_in_flight: how many saves may be staged or writing at once; each holds one staging
        buffer, so host memory is about max_in_flight times the state dict's tensor bytes. Two
        (the default, as in the adapters' AsyncOptions) let a save not wait for the previous
        one's write.
    in_flight_bytes: more saves than max_in_flight may be staged or writing while their
        staging buffers together hold at most this many bytes (default 256 MiB): small states
        saved often never wait for a writer that fell behind (it skips a queued save that a
        newer queued save of the same path replaces). 0: max_in_flight alone decides.
    incremental: skip what did not change since the previous save of the same state-dict
        shape. CPU tensors are hashed (xxh3, in parallel, GIL released) and those whose bytes
        the staging buffer already holds are not copied; the writer copies unchanged chunks from
        the previous checkpoint file inside the kernel (a shared-extent clone on XFS or btrfs)
        instead of writing them. Every file still loads on its own with torch.load.
    """

    use_pinned_memory: bool | None = None
    use_shared_memory: bool = True
    use_async_staging: bool | None = None
    use_non_blocking_copy: bool | None = None
    max_in_flight: int = 2
    incremental: bool = False
    in_flight_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        _require(
            isinstance(self.max_in_flight, int) and self.max_in_flight >= 1,
            f"CheckpointStagerConfig.max_in_flight must be an int >= 1, got {self.max_in_flight!r}",
        )
        _require(
            isinstance(self.in_flight_bytes, int) and self.in_flight_bytes >= 0,
            f"CheckpointStagerConfig.in_flight_bytes must be an int >= 0, got {self.in_flight_bytes!r}",
        )

    @property
    def pin(self) -> bool:
        if self.use_pinned_memory and not _cuda_available():
            logger.warning("use_pinned_memory=True is ignored: pinning needs CUDA, which is not available here")
            return False
        return _cuda_available() if self.use_pinned_memory is None else self.use_pinned_memory

    @property
    def async_staging(self) -> bool:
        return _cuda_available() if self.use_async_staging is None else self.use_async_staging

    @property
    def non_blocking(self) -> bool:
        return _cuda_available() if self.use_non_blocking_copy is None else self.use_non_blocking_copy


@dataclass
class RetentionConfig:
    """What the writer does in a checkpoint's parent directory after each commit.

    update_latest: point PARENT/latest at the new checkpoint (a symlink; a file or folder of
        yours named `latest` is left alone, with a warning). keep_last: keep the newest K
        checkpoints of the series there and delete older ones (None: keep all); keep_every:
        also keep those whose step is a multiple of N (step from save(..., step=N) or the name).
    series: the name retention marks its checkpoints with; it deletes only checkpoints that
        carry the same name, so nothing it did not write (your `pretrained.pt`, plain
        torch.save files, another run's checkpoints) is ever deleted. None: the checkpoint's
        name with its numbers replaced by `#` (`step_000120` is series `step_#`), which a run
        keeps across restarts. Give two runs that share a folder and a naming pattern their
        own series (or folders).
    Only checkpoints older than the one just committed are deleted, never an incomplete one (it
    may still be written) and never one a reader holds (it is retried after the next commit).
    """

    keep_last: int | None = None
    keep_every: int | None = None
    update_latest: bool = True
    series: str | None = None

    def __post_init__(self) -> None:
        _require(
            self.keep_last is None or self.keep_last >= 1,
            f"RetentionConfig.keep_last must be >= 1 or None, got {self.keep_last}",
        )
        _require(
            self.keep_every is None or self.keep_every >= 1,
            f"RetentionConfig.keep_every must be >= 1 or None, got {self.keep_every}",
        )
        _require(
            self.series is None or (isinstance(self.series, str) and self.series != ""),
            f"RetentionConfig.series must be a non-empty string or None, got {self.series!r}",
        )


@dataclass
class CheckpointWriterConfig:
    """How bytes reach the disk.

    layout: "directory" writes PATH/checkpoint_<rank>.pt; "file" writes exactly PATH.
    io_threads: parallel positioned writes (0: chosen from the CPU count).
    use_direct_io: O_DIRECT writes where the filesystem supports them (falls back silently).
    checksums: record xxh3-64 checksums in the manifest so that loads verify the bytes.
    shared_filesystem: every rank sees the same checkpoint directory (NFS, Lustre, one machine).
        False for per-node local disks: the first rank of each node (LOCAL_RANK 0) then writes
        that node's commit record too.
    write_barrier_timeout_secs: how long a rank waits for the others before a commit fails
        (the default barrier's timeout).
    retention: the `latest` pointer and which older checkpoints to delete (None: neither).
    copy_unchanged: for incremental saves, whether chunks unchanged since the previous file are
        copied from it inside the kernel instead of written from the snapshot: "auto" where the
        filesystem shares extents (XFS, btrfs: no data is written at all), "always" (e.g. NFS
        4.2, where the server copies), "never".
    """

    layout: Literal["directory", "file"] = "directory"
    write_barrier_timeout_secs: int = 600
    io_threads: int = 0
    use_direct_io: bool = True
    checksums: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    shared_filesystem: bool = True
    retention: RetentionConfig | None = None
    copy_unchanged: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        _require(
            self.layout in ("directory", "file"),
            f"CheckpointWriterConfig.layout must be 'directory' or 'file', got {self.layout!r}",
        )
        _require(
            self.copy_unchanged in ("auto", "always", "never"),
            f"CheckpointWriterConfig.copy_unchanged must be 'auto', 'always' or 'never', got {self.copy_unchanged!r}",
        )
        _require(self.io_threads >= 0, f"CheckpointWriterConfig.io_threads must be >= 0, got {self.io_threads}")
        _require(
            self.chunk_bytes >= 4096 and self.chunk_bytes % 4096 == 0,
            f"CheckpointWriterConfig.chunk_bytes must be a positive multiple of 4096, got {self.chunk_bytes}",
        )
        _require(
            self.write_barrier_timeout_secs > 0,
            f"CheckpointWriterConfig.write_barrier_timeout_secs must be > 0, got {self.write_barrier_timeout_secs}",
        )

    @property
    def threads(self) -> int:
        return self.io_threads or min(8, max(2, 2 * (os.cpu_count() or 1)))


@dataclass
class CheckpointProcessConfig:
    """The writer process: how long its start may take, and how long shutting down may wait.

    subprocess_init_timeout_secs: a writer that is starting is waited for as long as it makes
        progress (CPU time or reads: importing torch on a busy machine can take minutes); one
        that makes none for this long is stuck, and the writes waiting for it fail with
        WriterStartTimeoutError, as they do after 20 times this long in all. A writer that
        dies or reports an error fails them at once, with the cause.
    subprocess_shutdown_timeout_secs: after its last write, the writer is killed if it has not
        exited within this long.
    drain_timeout_secs: close() and interpreter exit wait this long for pending writes, then
        give up on them (their futures fail with DrainTimeoutError naming each path) and stop
        the writer.
    sigterm_drain_secs: on SIGTERM (preemption) the trainer first waits up to this long for
        pending writes, then runs the handler that was installed before (0: do not wait).
    writer_niceness: the writer's CPU priority below the trainer's (Unix nice, 0-19), from its
        start (its import of torch) on: where the training loop keeps every core busy, the
        writer takes the time the loop leaves. 0 runs it at the trainer's priority. On Linux
        the writer also runs as a batch task (SCHED_BATCH): a request that wakes it does not
        preempt a training thread in the middle of its time slice.
    """

    subprocess_init_timeout_secs: float = 30
    subprocess_shutdown_timeout_secs: float = 60
    drain_timeout_secs: float = 600
    sigterm_drain_secs: float = 120
    writer_niceness: int = 5

    def __post_init__(self) -> None:
        _require(self.subprocess_init_timeout_secs > 0, "subprocess_init_timeout_secs must be > 0")
        _require(self.subprocess_shutdown_timeout_secs > 0, "subprocess_shutdown_timeout_secs must be > 0")
        _require(self.drain_timeout_secs > 0, "drain_timeout_secs must be > 0")
        _require(self.sigterm_drain_secs >= 0, "sigterm_drain_secs must be >= 0")
        _require(0 <= self.writer_niceness <= 19, "writer_niceness must be in 0..19")


@dataclass
class BarrierConfig:
    """Which barrier holds the commit until every rank's files are durable, with its arguments.

    "auto" (default): none for a single rank; with several, "tcp_store" for the async writer
    process (a client of the MASTER_ADDR:MASTER_PORT store) and "dist_barrier" for
    SyncCheckpointer (a gloo group of its own). None: no barrier (single rank only).
    """

    barrier_type: str | None = "auto"
    barrier_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointerConfig:
    """All component configurations for make_sync_checkpointer / make_async_checkpointer."""

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
