"""Publishing a folder of files written elsewhere as one checkpoint folder.

The files of a multi-file checkpoint (Accelerate's model, optimizer, scheduler, RNG files...)
are written into a private staging folder on the same filesystem, then published. Publishing
only ever adds or replaces the files of this save: a new folder appears in one rename; into an
existing folder (the user's output directory, `.`, a folder holding an older checkpoint) each
file is moved over its namesake and nothing else there is touched.
"""

from __future__ import annotations

import os
import shutil

from .fsutil import fsync_directory


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
    published = _merge(staging, final)
    shutil.rmtree(staging, ignore_errors=True)
    return published


def _merge(source: str, target: str) -> list[str]:
    published = []
    for name in sorted(os.listdir(source)):
        here, there = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(here) and not os.path.islink(here) and os.path.isdir(there):
            published += _merge(here, there)
        else:
            os.replace(here, there)  # a folder only ever replaces a missing entry or a file
            published.append(there)
    fsync_directory(target)
    return published
