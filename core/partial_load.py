"""Partial loads: pairing the tensors of the caller's state dict with the checkpoint's, in place."""

from __future__ import annotations

from typing import Any

import torch

from . import torch_internals
from .errors import MissingKeysError


def match(
    loaded: Any,
    target: dict[Any, Any],
    prefix: str,
    missing: list[str],
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]],
    replaced: list[Any],
) -> None:
    """Pair each tensor of `target` with the checkpoint's; other values are replaced by the checkpoint's."""
    for key, want in target.items():
        name = f"{prefix}{key}"
        if not isinstance(loaded, dict) or key not in loaded:
            missing.append(name)
            continue
        have = loaded[key]
        if isinstance(want, torch.Tensor):
            if not isinstance(have, torch.Tensor):
                raise ValueError(f"key {name!r}: the checkpoint holds a {type(have).__name__}, not a tensor")
            if have.shape != want.shape or have.dtype != want.dtype:
                raise ValueError(
                    f"key {name!r}: the checkpoint holds shape {tuple(have.shape)} dtype {have.dtype}, "
                    f"the state dict expects shape {tuple(want.shape)} dtype {want.dtype}"
                )
            pairs.append((name, want, have))
        elif isinstance(want, dict) and isinstance(have, dict):
            match(have, want, f"{name}.", missing, pairs, replaced)
        else:
            target[key] = have
            replaced.append(have)


def raise_if_strict(path: str, missing: list[str], strict: bool) -> None:
    if strict and missing:
        raise MissingKeysError(f"Checkpoint at {path} is missing keys: {missing}")


def copy_pairs(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    torch_internals.copy_each((dest, source) for _, dest, source in pairs)
