"""Retention after a commit: move the `latest` pointer, delete checkpoints past the ones to keep.

Retention deletes only checkpoints it can prove are its own: every checkpoint saved with a
RetentionConfig carries its series name (in commit.json, and in the manifest of a single-file
checkpoint), and only complete checkpoints of the same series in the same folder are ever
deleted. A user's `pretrained.pt`, a plain torch.save file, another run's checkpoints (another
series) and checkpoints saved without retention are never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from .catalog import CheckpointInfo, list_checkpoints, update_latest
from .config import RetentionConfig
from .leftovers import TRASH_PREFIX, owner_token
from .leftovers import sweep as sweep_leftovers
from .locks import unless_in_use

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"\d+")


def series_of(path: str, config: RetentionConfig | None) -> str | None:
    """The series a checkpoint saved at `path` belongs to: the config's name, else the
    checkpoint's name with every number replaced by `#` (`step_000120` -> `step_#`), so one
    run's numbered checkpoints form one series across restarts. None without retention."""
    if config is None:
        return None
    if config.series is not None:
        return config.series
    return _NUMBER.sub("#", os.path.basename(os.path.normpath(os.fspath(path))))


def apply_retention(committed: str, config: RetentionConfig) -> list[str]:
    """Run `config` in the parent directory of the just-committed checkpoint; returns what it deleted."""
    committed = os.path.abspath(os.fspath(committed))
    root = os.path.dirname(committed)
    sweep_leftovers(root)
    if config.update_latest:
        update_latest(root, os.path.basename(committed))
    if config.keep_last is None:
        return []
    series = series_of(committed, config)
    listed = list_checkpoints(root)
    newest = next((info for info in listed if info.path == committed), None)
    if newest is None or not newest.complete:
        logger.warning("retention: %s is not listed as complete; nothing deleted", committed)
        return []
    owned = [info for info in listed if info.complete and info.series == series]
    newest_at = newest.committed_at or 0.0
    older = [info for info in owned[: -config.keep_last] if (info.committed_at or 0.0) <= newest_at]
    return [info.path for info in older if info.path != committed and not _kept(info, config) and _delete(info.path)]


def _kept(info: CheckpointInfo, config: RetentionConfig) -> bool:
    return config.keep_every is not None and info.step is not None and info.step % config.keep_every == 0


def _delete(path: str) -> bool:
    """Take the checkpoint out of sight in one rename, then remove it; skip it while a reader holds it.
    The trash carries this process's token: if it dies meanwhile, the next retention there removes it."""
    trash = os.path.join(os.path.dirname(path), f"{TRASH_PREFIX}{owner_token()}.{os.path.basename(path)}")
    with unless_in_use(path) as free:
        if not free:
            logger.info("retention: %s is being read; it will be deleted after a later commit", path)
            return False
        os.replace(path, trash)
    if os.path.isdir(trash):
        shutil.rmtree(trash)
    else:
        os.unlink(trash)
    logger.info("retention: deleted %s", path)
    return True
