"""pytest plugin: make every Lightning Trainer default to lightning_ckpt.AsyncCheckpointIO.

Load it with ``-p lightning_swap`` (PYTHONPATH must include this folder).  Set ASYNC_SWAP=0 to load it
without swapping (then it only records, which is the same as the baseline).

How the swap works: ``lightning.pytorch.strategies.strategy.Strategy.checkpoint_io`` creates
``TorchCheckpointIO()`` when the strategy has no CheckpointIO (and fills an empty
``_WrappingCheckpointIO`` with one).  That name is looked up in the module's globals, so
replacing ``lightning.pytorch.strategies.strategy.TorchCheckpointIO`` with a factory makes the
default an ``AsyncCheckpointIO()`` (a fresh one per strategy, as a user writing
``Trainer(plugins=[AsyncCheckpointIO()])`` would get), while a test that passes its own
CheckpointIO (plugins=[...] or strategy=...(checkpoint_io=...)) keeps it.  ``TorchCheckpointIO``
as imported by test modules is untouched, so isinstance checks against it still see the real class.

ASYNC_SWAP_SHARED=1 (diagnostic only): every Trainer of a test shares one AsyncCheckpointIO.

Per test, the plugin writes a JSON line to $ASYNC_SWAP_LOG (if set) with how many
AsyncCheckpointIO instances were created and how many save/load/remove calls went through them.
"""

from __future__ import annotations

import json
import os

import lightning.pytorch.strategies.strategy as _strategy_module
import pytest

from lightning_ckpt import AsyncCheckpointIO

_CREATED: list = []
_COUNTS = {"save": 0, "load": 0, "remove": 0, "teardown": 0}


class _CountingAsyncCheckpointIO(AsyncCheckpointIO):
    """AsyncCheckpointIO, counting calls (behaviour unchanged)."""

    def save_checkpoint(self, *args, **kwargs):
        _COUNTS["save"] += 1
        return super().save_checkpoint(*args, **kwargs)

    def load_checkpoint(self, *args, **kwargs):
        _COUNTS["load"] += 1
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args, **kwargs):
        _COUNTS["remove"] += 1
        return super().remove_checkpoint(*args, **kwargs)

    def teardown(self):
        _COUNTS["teardown"] += 1
        return super().teardown()


def _default_checkpoint_io():
    if os.environ.get("ASYNC_SWAP_SHARED") == "1" and _CREATED:
        return _CREATED[0]  # diagnostic mode: one instance shared by every Trainer of the test
    io = (_CountingAsyncCheckpointIO if os.environ.get("ASYNC_SWAP_COUNT", "1") == "1" else AsyncCheckpointIO)()
    _CREATED.append(io)
    return io


def _swap_enabled() -> bool:
    return os.environ.get("ASYNC_SWAP", "1") != "0"


@pytest.fixture(autouse=True)
def async_checkpoint_io_swap(request):
    # A private MonkeyPatch, not the `monkeypatch` fixture: requesting that fixture here would set it
    # up before Lightning's restore_env_variables and make tests that monkeypatch.setenv look leaky.
    patcher = pytest.MonkeyPatch()
    _CREATED.clear()
    for key in _COUNTS:
        _COUNTS[key] = 0
    if _swap_enabled():
        patcher.setattr(_strategy_module, "TorchCheckpointIO", _default_checkpoint_io)
    yield
    patcher.undo()
    log = os.environ.get("ASYNC_SWAP_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": request.node.nodeid, "created": len(_CREATED), **_COUNTS}) + "\n")
    if os.environ.get("ASYNC_SWAP_CLOSE_LEFTOVERS") == "1":
        # Optional, off by default: close writers a test left running (runs after Lightning's
        # thread police, so it does not hide its findings; it only keeps later tests clean).
        for io in _CREATED:
            try:
                io.teardown()
            except Exception:
                pass
    _CREATED.clear()
