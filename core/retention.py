"""Retention after a commit: move the `latest` pointer, delete checkpoints past the ones to keep."""

from __future__ import annotations

import logging
import os
import shutil
import uuid

from .catalog import CheckpointInfo, list_checkpoints, update_latest
from .config import RetentionConfig
from .locks import unless_in_use

logger = logging.getLogger(__name__)


def apply_retention(committed: str, config: RetentionConfig) -> list[str]:
    """Run `config` in the parent directory of the just-committed checkpoint; returns what it deleted."""
    committed = os.path.abspath(os.fspath(committed))
    root = os.path.dirname(committed)
    if config.update_latest:
        update_latest(root, os.path.basename(committed))
    if config.keep_last is None:
        return []
    complete = [info for info in list_checkpoints(root) if info.complete]
    newest = next((info for info in complete if info.path == committed), None)
    if newest is None:
        logger.warning("retention: %s is not listed as complete; nothing deleted", committed)
        return []
    newest_at = newest.committed_at or 0.0
    older = [info for info in complete[: -config.keep_last] if (info.committed_at or 0.0) <= newest_at]
    deleted = [info.path for info in older if info.path != committed and not _kept(info, config) and _delete(info.path)]
    return deleted


def _kept(info: CheckpointInfo, config: RetentionConfig) -> bool:
    return config.keep_every is not None and info.step is not None and info.step % config.keep_every == 0


def _delete(path: str) -> bool:
    """Take the checkpoint out of sight in one rename, then remove it; skip it while a reader holds it."""
    trash = os.path.join(os.path.dirname(path), f".async_ckpt_trash.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}")
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
