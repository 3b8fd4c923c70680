"""The on/off flag: an environment variable that `accelerate launch` passes to every rank."""

from __future__ import annotations

import os

ENV_FLAG = "ACCELERATE_ASYNC_CHECKPOINT"
_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


def async_checkpointing_enabled(enabled: bool | None = None) -> bool:
    """`enabled` when given; else the ACCELERATE_ASYNC_CHECKPOINT variable; on when that is unset or empty.

    Raises ValueError naming the variable when it holds anything but 1/true/yes/on or 0/false/no/off.
    """
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
        return enabled
    raw = os.environ.get(ENV_FLAG)
    if raw is None or not raw.strip():  # unset, or set empty: the default
        return True
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"environment variable {ENV_FLAG}={raw!r} is not understood: use 1/true/yes to turn async "
        "checkpointing on or 0/false/no to turn it off"
    )
