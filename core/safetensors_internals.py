"""The one private safetensors name async-ckpt relies on: its table of dtype codes.

Looked up on first use (safetensors is needed only for safetensors files, which Accelerate
writes); see internals.py for what happens when a release moves it.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import Any

import torch

from .internals import lookup

TESTED_SAFETENSORS = "0.8"
NAMES = ("safetensors.torch._TYPES",)


@functools.cache
def dtype_codes() -> dict[str, torch.dtype]:
    """safetensors' dtype code ("F32", "BF16", ...) for each dtype it stores."""
    table: Any = lookup(NAMES[0], "safetensors", version("safetensors"), TESTED_SAFETENSORS)
    return dict(table)
