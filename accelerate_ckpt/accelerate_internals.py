"""Every private Accelerate name the hook relies on, reached from here only.

Accelerate's own save_state() writes what `prepare()` and `register_for_checkpointing()`
registered on the Accelerator, which it keeps in private lists; the hook snapshots the same
objects. Module-level names are looked up when this module is imported (a release that moved one
raises InternalsMovedError naming it); the instance attributes are checked by
tests/test_internals.py with a real Accelerator.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from core.internals import lookup

TESTED_ACCELERATE = "1.15"
NAMES = ("accelerate.utils.other.clean_state_dict_for_safetensors",)
ATTRIBUTES = ("_models", "_optimizers", "_schedulers", "_dataloaders", "_custom_objects", "_save_model_state_pre_hook")

clean_state_dict_for_safetensors: Callable[[dict[str, Any]], dict[str, Any]] = lookup(
    NAMES[0], "accelerate", version("accelerate"), TESTED_ACCELERATE
)


def models(accelerator: Any) -> list[Any]:
    """The models prepare() registered, in order."""
    return list(accelerator._models)


def optimizers(accelerator: Any) -> list[Any]:
    return list(accelerator._optimizers)


def schedulers(accelerator: Any) -> list[Any]:
    return list(accelerator._schedulers)


def dataloaders(accelerator: Any) -> list[Any]:
    return list(accelerator._dataloaders)


def custom_objects(accelerator: Any) -> list[Any]:
    """The objects register_for_checkpointing() registered, in order."""
    return list(accelerator._custom_objects)


def save_model_state_pre_hooks(accelerator: Any) -> list[Callable[..., Any]]:
    """The hooks register_save_state_pre_hook() registered, in order."""
    return list(accelerator._save_model_state_pre_hook.values())
