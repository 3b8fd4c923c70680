"""conftest.py for running Accelerate's own tests with the async hook on every Accelerator.

Copy it next to Accelerate's test files (outside this repository) as conftest.py. After the
original __init__, every Accelerator gets enable_async_checkpointing(self); each test's handles
are closed at its end, and errors raised while closing are reported, not hidden.
"""

import accelerate
import pytest

import accelerate_ckpt

_original_init = accelerate.Accelerator.__init__
_handles = []


def _init_with_async_hook(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    _handles.append(accelerate_ckpt.enable_async_checkpointing(self))


accelerate.Accelerator.__init__ = _init_with_async_hook


@pytest.fixture(autouse=True)
def _close_handles():
    start = len(_handles)
    yield
    errors = []
    for handle in _handles[start:]:
        try:
            handle.close()
        except BaseException as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    del _handles[start:]
    if errors:
        pytest.fail("closing the async hook failed: " + "; ".join(errors))
