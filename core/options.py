"""AsyncOptions: the options of a checkpointer that saves one file per save at the path given.

Both adapters (the Lightning plugin and the Accelerate hook) take exactly these options, by
name (`AsyncCheckpointIO(max_in_flight=3)`) or as one object (`AsyncCheckpointIO(options)`),
and build their configuration from them; a full CheckpointerConfig replaces them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import CheckpointerConfig, CheckpointStagerConfig, CheckpointWriterConfig


@dataclass(frozen=True)
class AsyncOptions:
    """max_in_flight: checkpoints that may be staged or writing at once (host memory is about
        that many copies of the saved state); a further save waits for the oldest. Two let a
        save not wait for the previous one's write (ModelCheckpoint's top-k file and last.ckpt
        of one step).
    in_flight_bytes: more checkpoints than max_in_flight may be in flight while their staging
        memory together stays within this many bytes (default 256 MiB; see
        CheckpointStagerConfig): small states saved often never wait for the writer.
    pin_memory: stage into pinned memory for fast GPU copies (None: when CUDA is available).
    checksums: store checksums so that loads verify the bytes.
    use_direct_io: write with O_DIRECT where the filesystem supports it.
    io_threads: parallel writes per checkpoint (0: chosen from the CPU count).
    incremental: skip tensors unchanged since the previous save (see CheckpointStagerConfig).
    barrier_timeout_secs: how long a rank waits for the others' files before a save fails.
    """

    max_in_flight: int = 2
    in_flight_bytes: int = 256 << 20
    pin_memory: bool | None = None
    checksums: bool = True
    use_direct_io: bool = True
    io_threads: int = 0
    incremental: bool = False
    barrier_timeout_secs: int = 600

    def __post_init__(self) -> None:
        for name in ("checksums", "use_direct_io", "incremental"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise TypeError(f"pin_memory must be True, False or None, got {self.pin_memory!r}")
        for name in ("max_in_flight", "in_flight_bytes", "io_threads", "barrier_timeout_secs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.barrier_timeout_secs <= 0:
            raise ValueError(f"barrier_timeout_secs must be positive, got {self.barrier_timeout_secs}")

    def config(self, base: CheckpointerConfig | None = None) -> CheckpointerConfig:
        """The configuration to save with: `base` when given (ignoring these options), else one
        built from them; either way with the writer's layout set to "file" (the caller's object
        is left as it was)."""
        if base is None:
            base = CheckpointerConfig(
                writer_config=CheckpointWriterConfig(
                    checksums=self.checksums,
                    use_direct_io=self.use_direct_io,
                    io_threads=self.io_threads,
                    write_barrier_timeout_secs=self.barrier_timeout_secs,
                ),
                staging_config=CheckpointStagerConfig(
                    max_in_flight=self.max_in_flight,
                    in_flight_bytes=self.in_flight_bytes,
                    use_pinned_memory=self.pin_memory,
                    incremental=self.incremental,
                ),
            )
        return dataclasses.replace(base, writer_config=dataclasses.replace(base.writer_config, layout="file"))
