"""Publishing a folder of files written elsewhere as one checkpoint folder.

The files of a multi-file checkpoint (Accelerate's model, optimizer, scheduler, RNG files...)
are written into a private staging folder on the same filesystem, then published. Publishing
only ever adds or replaces the files of this save: a new folder appears in one rename; into an
existing folder (the user's output directory, `.`, a folder holding an older checkpoint) each
file is moved over its namesake and nothing else there is touched.

Moving several files is not atomic, so a durable marker (`<staging>.publishing`) exists while
they move: a process that dies halfway leaves it, and a reader that finds a marker whose owner
is dead knows the folder mixes two saves (see `interrupted_publish`). The next complete
publish into that folder replaces every file of the mix and removes the marker.
"""

from __future__ import annotations

import os
import shutil

from core.fsutil import fsync_directory
from core.leftovers import MARKER_PREFIX, PUBLISHING_SUFFIX, owner_alive


def publish_directory(staging: str, final: str) -> list[str]:
    """Move everything in `staging` into `final` durably and remove `staging`; returns the
    published paths. `final`'s other contents, and `final` itself, are never removed."""
    final = os.path.abspath(final)
    if not os.path.lexists(final):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        names = sorted(os.listdir(staging))
        os.rename(staging, final)
        fsync_directory(os.path.dirname(final))
        return [os.path.join(final, name) for name in names]
    marker = staging.rstrip(os.sep) + PUBLISHING_SUFFIX
    with open(marker, "wb"):
        pass
    fsync_directory(os.path.dirname(marker))
    published = _merge(staging, final)
    shutil.rmtree(staging, ignore_errors=True)
    pending = os.path.dirname(marker)
    for name in os.listdir(pending):  # this publish replaced every file a dead one left mixed
        if name.endswith(PUBLISHING_SUFFIX) and owner_alive(name) is False:
            os.unlink(os.path.join(pending, name))
    os.unlink(marker)
    return published


def interrupted_publish(pending: str) -> str | None:
    """The marker in the pending folder `pending` of a publish whose process died halfway (the
    folder above mixes two saves), or None."""
    try:
        names = os.listdir(pending)
    except OSError:
        return None
    dead = [n for n in names if n.endswith(PUBLISHING_SUFFIX) and owner_alive(n) is False]
    return os.path.join(pending, dead[0]) if dead else None


def _merge(source: str, target: str) -> list[str]:
    published = []
    for name in sorted(os.listdir(source)):
        if name.startswith(MARKER_PREFIX):
            continue  # a pending write's marker is not part of the checkpoint
        here, there = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(here) and not os.path.islink(here) and os.path.isdir(there):
            published += _merge(here, there)
        else:
            os.replace(here, there)  # a folder only ever replaces a missing entry or a file
            published.append(there)
    fsync_directory(target)
    return published
