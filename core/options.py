"""One set of options for both adapters, turned into the core's configuration.

The Lightning plugin and the Accelerate hook take the same keyword options and validate them
the same way; each writes one file per save (layout "file") through an AsyncCheckpointer.
"""

from __future__ import annotations

import dataclasses

from .config import CheckpointerConfig, CheckpointStagerConfig, CheckpointWriterConfig


def adapter_config(
    config: CheckpointerConfig | None = None,
    *,
    max_in_flight: int = 2,
    pin_memory: bool | None = None,
    checksums: bool = True,
    use_direct_io: bool = True,
    io_threads: int = 0,
    incremental: bool = False,
    barrier_timeout_secs: int = 600,
) -> CheckpointerConfig:
    """The configuration an adapter saves with: `config` when given (its writer layout set to
    "file", the caller's object left as it was), else one built from the options."""
    if config is None:
        for name, flag in (("checksums", checksums), ("use_direct_io", use_direct_io), ("incremental", incremental)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be True, False or None, got {pin_memory!r}")
        for name, value in (("io_threads", io_threads), ("barrier_timeout_secs", barrier_timeout_secs)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
        config = CheckpointerConfig(
            writer_config=CheckpointWriterConfig(
                checksums=checksums,
                use_direct_io=use_direct_io,
                io_threads=io_threads,
                write_barrier_timeout_secs=barrier_timeout_secs,
            ),
            staging_config=CheckpointStagerConfig(
                max_in_flight=max_in_flight, use_pinned_memory=pin_memory, incremental=incremental
            ),
        )
    return dataclasses.replace(config, writer_config=dataclasses.replace(config.writer_config, layout="file"))


def with_slabs_per_save(config: CheckpointerConfig, files_per_save: int) -> CheckpointerConfig:
    """`config` with room for `max_in_flight` whole saves of `files_per_save` files each
    (every file of a save holds a staging slab of its own); everything else kept."""
    staging = config.staging_config
    return dataclasses.replace(
        config,
        staging_config=dataclasses.replace(staging, max_in_flight=staging.max_in_flight * max(files_per_save, 1)),
    )
