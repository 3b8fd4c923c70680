"""CheckpointReader: full and partial loads, verified against the manifest, weights_only by default."""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint_file import CheckpointFile
from .errors import CorruptCheckpointError, NotACheckpointError, UncommittedCheckpointError
from .fsutil import buffer_of
from .locks import reading
from .map_location import apply_map_location
from .partial_load import copy_pairs, match, raise_if_strict
from .resolve import resolve_checkpoint_file
from .sharded_load import ShardedCheckpoint, load_sharded, open_sharded
from .torch_internals import storage_key
from .types import STATE_DICT, RankInfo, default_rank_info
from .unpickle import LazyStorages, unpickle, walk_tensors

logger = logging.getLogger(__name__)


class CheckpointReader:
    """Reads checkpoints written by CheckpointWriter (and any torch.save zip file).

    Every byte it reads from a file with a manifest is checked against its checksum unless
    `verify=False`; a damaged file raises CorruptCheckpointError naming the damaged record
    and the state dict keys that use it. Loads never run code from the file unless the caller
    passes weights_only=False.
    """

    def __init__(self, rank_info: RankInfo | None = None, io_threads: int = 4) -> None:
        self._rank_info = rank_info or default_rank_info()
        self._io_threads = io_threads

    def read(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        map_location: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, list[str]]:
        """Load a checkpoint; returns (state dict, missing keys).

        Without `state_dict`: the whole checkpoint. With one: only its keys are read, copied in
        place into its tensors (a shape or dtype mismatch raises ValueError naming the key),
        and only the bytes of those tensors are read; a key set to None takes the checkpoint's
        whole value. Keyword arguments: `strict=True` raises MissingKeysError (a RuntimeError)
        on keys of `state_dict` that the checkpoint lacks; `weights_only` (default True);
        `verify` (default True: check every byte read against the manifest); `source_rank`
        (read another rank's file of a directory checkpoint; see resolve_checkpoint_file).
        torch.load's `mmap` and `encoding` are accepted and have no effect; any other keyword is
        ignored with a UserWarning naming it (torch's reader ignores them silently).
        """
        options = _ReadOptions.of(kwargs)
        with reading(path):
            sharded = open_sharded(path)
            if sharded is not None:
                return self._read_sharded(path, sharded, state_dict, map_location, options)
            resolved = resolve_checkpoint_file(path, self._rank_info, options.source_rank)
            with CheckpointFile(resolved.path, legacy_ok=True) as ckpt:
                if ckpt.legacy:
                    return self._read_legacy(ckpt, state_dict, map_location, options)
                if resolved.write_id is not None and ckpt.write_id != resolved.write_id:
                    raise UncommittedCheckpointError(
                        f"checkpoint {os.fspath(path)!r} is not committed: {resolved.path} comes from a later save to "
                        "the same path than its commit record, which did not finish. Resume from an earlier checkpoint"
                    )
                storages = LazyStorages(ckpt)
                loaded = unpickle(ckpt, storages, options.weights_only, options.verify)
                if state_dict is None:
                    self._fill(ckpt, storages, set(storages.by_key), loaded, options.verify)
                    return apply_map_location(loaded, storages.by_key, map_location), []
                return self._read_into(ckpt, storages, loaded, state_dict, options)

    def _read_legacy(
        self, ckpt: CheckpointFile, state_dict: STATE_DICT | None, map_location: Any, options: _ReadOptions
    ) -> tuple[Any, list[str]]:
        """A torch.save file in the format before PyTorch 1.6: loaded whole by torch.load (no checksums)."""
        try:
            with os.fdopen(os.dup(ckpt.fd), "rb") as f:
                loaded = torch.load(f, map_location=map_location, weights_only=options.weights_only)
        except Exception as exc:  # the legacy format's every failure: damage, or refused objects
            raise NotACheckpointError(f"legacy checkpoint {ckpt.path!r} cannot be read ({exc})") from None
        if state_dict is None:
            return loaded, []
        missing: list[str] = []
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        match(loaded, state_dict, "", missing, pairs, [])
        raise_if_strict(ckpt.path, missing, options.strict)
        copy_pairs(pairs)
        return state_dict, missing

    def _read_sharded(
        self,
        path: str,
        sharded: ShardedCheckpoint,
        state_dict: STATE_DICT | None,
        map_location: Any,
        options: _ReadOptions,
    ) -> tuple[Any, list[str]]:
        """A sharded checkpoint (see sharded_load.py): whole, or into `state_dict` at any world size."""
        with sharded:
            loaded, missing = load_sharded(
                sharded, state_dict, verify=options.verify, weights_only=options.weights_only
            )
        raise_if_strict(os.fspath(path), missing, options.strict)
        if state_dict is not None:
            return loaded, missing
        storages = {str(i): tensor.untyped_storage() for i, (_, tensor) in enumerate(walk_tensors(loaded))}
        return apply_map_location(loaded, storages, map_location), []

    def read_structure(self, path: str, *, source_rank: int | None = None, weights_only: bool = True) -> Any:
        """The checkpoint's objects with every tensor's shape and dtype, without reading tensor bytes
        (tensor values are undefined): what `inspect` shows. A sharded checkpoint's tensors are
        meta tensors of their global shapes."""
        with reading(path):
            sharded = open_sharded(path)
            if sharded is not None:
                with sharded:
                    return sharded.structure()
            resolved = resolve_checkpoint_file(path, self._rank_info, source_rank)
            with CheckpointFile(resolved.path) as ckpt:
                return unpickle(ckpt, LazyStorages(ckpt), weights_only, verify=True)

    def _fill(self, ckpt: CheckpointFile, storages: LazyStorages, keys: set[str], loaded: Any, verify: bool) -> None:
        def fill(key: str) -> str | None:
            dest = buffer_of(torch.empty(0, dtype=torch.uint8).set_(storages.by_key[key]))
            return None if ckpt.read_storage(key, dest, verify=verify) else key

        ordered = sorted(keys, key=lambda k: -storages.by_key[k].nbytes())
        with ThreadPoolExecutor(self._io_threads) as pool:
            damaged = [k for k in pool.map(fill, ordered) if k is not None]
        if damaged:
            users = [
                name
                for name, t in walk_tensors(loaded)
                if storages.key_of.get(storage_key(t.untyped_storage())) in damaged
            ]
            raise CorruptCheckpointError(
                f"checkpoint {ckpt.path!r} is damaged: record(s) {', '.join('data/' + k for k in sorted(damaged))} "
                f"fail their checksum; affected tensors: {users or 'unknown'}. Use an earlier checkpoint"
            )

    def _read_into(
        self, ckpt: CheckpointFile, storages: LazyStorages, loaded: Any, target: STATE_DICT, options: _ReadOptions
    ) -> tuple[STATE_DICT, list[str]]:
        missing: list[str] = []
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        replaced: list[Any] = []
        match(loaded, target, "", missing, pairs, replaced)
        raise_if_strict(ckpt.path, missing, options.strict)
        sources = [source for _, _, source in pairs] + [t for _, t in walk_tensors(replaced)]
        needed = {storages.key_of[storage_key(source.untyped_storage())] for source in sources}
        self._fill(ckpt, storages, needed, loaded, options.verify)
        copy_pairs(pairs)
        return target, missing


# torch.load's own keywords that a load through CheckpointReader accepts and has no use for.
_TORCH_LOAD_KEYWORDS = frozenset({"mmap", "encoding"})


@dataclass(frozen=True)
class _ReadOptions:
    strict: bool = False
    weights_only: bool = True
    verify: bool = True
    source_rank: int | None = None

    @classmethod
    def of(cls, kwargs: dict[str, Any]) -> _ReadOptions:
        names = ("strict", "weights_only", "verify", "source_rank")
        unknown = sorted(set(kwargs) - set(names) - _TORCH_LOAD_KEYWORDS)
        if unknown:  # torch's reader ignores them too; a typo (weight_only=) must not pass unseen
            warnings.warn(
                f"CheckpointReader.read() ignores unknown keyword argument(s) {unknown}; it takes "
                f"map_location, {', '.join(names)} (and torch.load's {sorted(_TORCH_LOAD_KEYWORDS)}, which it ignores)",
                UserWarning,
                stacklevel=3,
            )
        known = {name: kwargs[name] for name in names if name in kwargs}
        if known.get("weights_only") is None:
            known.pop("weights_only", None)
        return cls(**known)
