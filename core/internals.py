"""Looking up a framework's private names, failing loudly with the name when one has moved.

Each framework whose internals async-ckpt uses has one module that reaches them (see
torch_internals.py, lightning_ckpt/lightning_internals.py, accelerate_ckpt/accelerate_internals.py)
and nothing else reaches them. Those modules look every name up when they are imported, through
`lookup`, and list them in a NAMES tuple that tests/test_internals.py checks one by one.
"""

from __future__ import annotations

import importlib
from typing import Any


class InternalsMovedError(ImportError):
    """A framework release no longer has a private name that async-ckpt relies on."""


def lookup(dotted: str, framework: str, version: str, tested: str) -> Any:
    """The object at `dotted` (a module path, then attributes), or InternalsMovedError naming it."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                found = getattr(found, attribute)
        except AttributeError:
            break
        return found
    raise InternalsMovedError(
        f"async-ckpt needs {dotted}, which {framework} {version} does not have. async-ckpt was tested with "
        f"{framework} {tested}: install that release, or an async-ckpt that supports {framework} {version}"
    )
