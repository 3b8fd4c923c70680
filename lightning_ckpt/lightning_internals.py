"""Every private Lightning name the plugin relies on, reached from here only.

A CheckpointIO is never handed its Trainer; the plugin finds the Trainer that is saving from the
strategy on the call stack, through the LightningModule's `_trainer` (the attribute behind its
`trainer` property, which raises instead of returning None when no Trainer is attached).
tests/test_internals.py checks it with a real Trainer.
"""

from __future__ import annotations

from typing import Any

TESTED_LIGHTNING = "2.6"


def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None."""
    return module._trainer
