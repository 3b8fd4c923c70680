"""`python -m core` (installed as `async-ckpt`): ls, inspect, verify, diff and convert checkpoints.

Tables for people, `--json` for scripts. Exit codes: `verify` 0 when every checkpoint is
complete and its bytes match their checksums, 1 otherwise; `diff` 0 when the checkpoints hold
the same values, 1 when they differ (as diff(1)); `inspect` and `diff` 1 when a checkpoint is
damaged; every command 2 for a bad invocation or a path that holds no checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .catalog import CheckpointInfo, describe_checkpoint, list_checkpoints, read_latest
from .convert import to_torch_save
from .errors import CheckpointError, CheckpointNotFoundError, NotACheckpointError
from .leftovers import Leftover
from .leftovers import find as find_leftovers
from .reader import CheckpointReader
from .types import RankInfo

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except (CheckpointNotFoundError, NotACheckpointError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as exc:  # damaged, or written by more ranks than --rank names
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return EXIT_DIFFERENT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="Inspect and verify async-ckpt checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.set_defaults(run=run)
        return sub

    ls = command("ls", _ls, "list the checkpoints in a directory: step, size, time, complete or not")
    ls.add_argument("directory")
    ls.add_argument("--deep", action="store_true", help="read every byte against its checksums")
    inspect = command("inspect", _inspect, "keys, shapes, dtypes, bytes per top-level group and other values")
    inspect.add_argument("path")
    inspect.add_argument("--rank", type=int, default=0, help="which rank's file of a directory checkpoint")
    verify = command("verify", _verify, "check that checkpoints are complete and every byte matches its checksum")
    verify.add_argument("paths", nargs="+")
    convert = command("convert", _convert, "write a checkpoint (sharded ones too) as one plain torch.load file")
    convert.add_argument("path")
    convert.add_argument("output")
    convert.add_argument("--key", help="keep only this top-level entry (e.g. model)")
    diff = command("diff", _diff, "which tensors and values differ between two checkpoints, and by how much")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--rank", type=int, default=0, help="which rank's file of directory checkpoints")
    return parser


# ---------------------------------------------------------------- ls


def _ls(args: argparse.Namespace) -> int:
    infos = list_checkpoints(args.directory, deep=args.deep)
    latest = read_latest(args.directory)
    rows = [_info_json(info) | {"latest": latest is not None and info.name == _basename(latest)} for info in infos]
    rows += [_leftover_json(leftover) for leftover in find_leftovers(args.directory)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    table = [
        [
            row["name"] + (" -> latest" if row["latest"] else ""),
            "" if row["step"] is None else str(row["step"]),
            _size(row["nbytes"]),
            _time(row["committed_at"]),
            "complete" if row["complete"] else f"{_not_complete(row)}: {row['reason']}",
        ]
        for row in rows
    ]
    _print_table(["name", "step", "size", "committed", "status"], table)
    return EXIT_OK


def _leftover_json(leftover: Leftover) -> dict[str, Any]:
    """A row for what a save in progress, or one that was interrupted, left in the folder."""
    if leftover.owner_alive:
        reason = "a save in progress"
    elif leftover.owner_alive is False:
        reason = "left by a process that died; the next save into this folder removes it"
    else:
        reason = "left by a process of another machine (or unknown); remove it once no save runs there"
    return {
        "name": leftover.name,
        "path": leftover.path,
        "kind": "leftover",
        "step": None,
        "nbytes": leftover.nbytes,
        "committed_at": None,
        "complete": False,
        "reason": reason,
        "world_size": None,
        "metadata": {},
        "latest": False,
    }


def _not_complete(row: dict[str, Any]) -> str:
    return "LEFTOVER" if row["kind"] == "leftover" else "INCOMPLETE"


def _info_json(info: CheckpointInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "path": info.path,
        "kind": info.kind,
        "step": info.step,
        "nbytes": info.nbytes,
        "committed_at": info.committed_at,
        "complete": info.complete,
        "reason": info.reason,
        "world_size": info.world_size,
        "metadata": info.metadata,
    }


# ---------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    info = describe_checkpoint(args.path)
    structure = CheckpointReader(RankInfo(0, 1)).read_structure(args.path, source_rank=args.rank)
    leaves = _flatten(structure)
    tensors = {k: v for k, v in leaves.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in leaves.items() if not isinstance(v, torch.Tensor)}
    groups: dict[str, dict[str, int]] = {}
    for key, tensor in tensors.items():
        group = groups.setdefault(key.split(".", 1)[0], {"tensors": 0, "nbytes": 0})
        group["tensors"] += 1
        group["nbytes"] += _nbytes(tensor)
    report = _info_json(info) | {
        "tensors": [
            {"key": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "nbytes": _nbytes(t)}
            for k, t in tensors.items()
        ],
        "groups": groups,
        "values": {k: _short_repr(v) for k, v in values.items()},
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return EXIT_OK
    status = "complete" if info.complete else f"INCOMPLETE: {info.reason}"
    print(f"{info.path}  step {info.step}  {_size(info.nbytes)}  {status}")
    print(f"\n{len(tensors)} tensors, {_size(sum(g['nbytes'] for g in groups.values()))} of tensor data\n")
    _print_table(["group", "tensors", "bytes"], [[g, str(v["tensors"]), _size(v["nbytes"])] for g, v in groups.items()])
    print()
    _print_table(
        ["key", "shape", "dtype", "bytes"],
        [[t["key"], str(tuple(t["shape"])), t["dtype"], _size(t["nbytes"])] for t in report["tensors"]],
    )
    if values:
        print()
        _print_table(["key", "value"], [[k, v] for k, v in report["values"].items()])
    return EXIT_OK


_MAX_ENTRIES = 10_000_000


def _flatten(obj: Any) -> dict[str, Any]:
    """Dotted key -> leaf, for nested dicts, lists and tuples. A container the structure holds
    more than once is expanded once; later places show `<same as KEY>` (a hostile pickle can
    share one list at every level: 2**60 paths in a few KiB)."""
    flat: dict[str, Any] = {}
    first_seen: dict[int, str] = {}
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        prefix, item, depth = stack.pop()
        if isinstance(item, dict):
            items: Any = item.items()
        elif isinstance(item, (list, tuple)) and not isinstance(item, torch.Size):
            items = enumerate(item)
        else:
            flat[prefix or "<root>"] = item
            continue
        if id(item) in first_seen:
            flat[prefix or "<root>"] = f"<same as {first_seen[id(item)] or '<root>'}>"
            continue
        first_seen[id(item)] = prefix
        if len(flat) + len(first_seen) > _MAX_ENTRIES:
            raise CheckpointError(f"the checkpoint holds more than {_MAX_ENTRIES} entries: too many to list")
        stack.extend(reversed([(_key(prefix, key, depth), value, depth + 1) for key, value in items]))
    return flat


_MAX_KEY_DEPTH = 1000  # far deeper than any state dict nests: beyond it keys stop growing (else quadratic)


def _key(prefix: str, key: Any, depth: int) -> str:
    if depth >= _MAX_KEY_DEPTH:
        return prefix if prefix.endswith(".<deeper>") else f"{prefix}.<deeper>"
    return f"{prefix}.{key}" if prefix else str(key)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- verify


def _verify(args: argparse.Namespace) -> int:
    results = []
    for path in args.paths:
        info = describe_checkpoint(path, deep=True)
        results.append({"path": info.path, "ok": info.complete, "reason": info.reason, "nbytes": info.nbytes})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for result in results:
            print(
                f"{'OK     ' if result['ok'] else 'DAMAGED'} {result['path']}"
                + (f": {result['reason']}" if result["reason"] else "")
            )
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_DIFFERENT


# ---------------------------------------------------------------- convert


def _convert(args: argparse.Namespace) -> int:
    try:
        output = to_torch_save(args.path, args.output, key=args.key)
    except KeyError as exc:
        print(f"python -m core convert: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"path": args.path, "output": output}))
    else:
        print(f"wrote {output}")
    return EXIT_OK


# ---------------------------------------------------------------- diff


def _diff(args: argparse.Namespace) -> int:
    reader = CheckpointReader(RankInfo(0, 1))
    a = _flatten(reader.read(args.a, source_rank=args.rank)[0])
    b = _flatten(reader.read(args.b, source_rank=args.rank)[0])
    changed, unchanged = [], 0
    for key in (k for k in a if k in b):
        change = _compare(a[key], b[key])
        if change is None:
            unchanged += 1
        else:
            changed.append({"key": key, **change})
    report = {
        "a": args.a,
        "b": args.b,
        "unchanged": unchanged,
        "changed": changed,
        "only_in_a": [k for k in a if k not in b],
        "only_in_b": [k for k in b if k not in a],
    }
    same = not (changed or report["only_in_a"] or report["only_in_b"])
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"{unchanged} unchanged, {len(changed)} changed, {len(report['only_in_a'])} only in a, "
            f"{len(report['only_in_b'])} only in b"
        )
        if changed:
            print()
            _print_table(
                ["key", "change", "max |a-b|", "|a-b| / |a|"],
                [
                    [c["key"], c["kind"], _number(c.get("max_abs_diff")), _number(c.get("relative_change"))]
                    for c in changed
                ],
            )
        for side in ("only_in_a", "only_in_b"):
            for key in report[side]:
                print(f"{side.replace('_', ' ')}: {key}")
    return EXIT_OK if same else EXIT_DIFFERENT


def _compare(a: Any, b: Any) -> dict[str, Any] | None:
    """None when equal; otherwise what differs and, for tensors of one shape, by how much."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return {"kind": f"{tuple(a.shape)} {a.dtype} -> {tuple(b.shape)} {b.dtype}"}
        if _overlapping(a) or _overlapping(b):
            # More elements than memory (an expanded or broadcast view): compare the memory they view.
            if (a.stride(), a.storage_offset()) == (b.stride(), b.storage_offset()) and bytes(
                a.untyped_storage()
            ) == bytes(b.untyped_storage()):
                return None
            return {"kind": "values (overlapping views of different memory)"}
        if torch.equal(a, b):
            return None
        if a.dtype == torch.bool:
            return {"kind": "values", "differing_elements": int((a != b).sum())}
        wide = torch.complex128 if a.dtype.is_complex else torch.float64
        difference = b.to(wide) - a.to(wide)
        scale = float(torch.linalg.vector_norm(a.to(wide)))
        return {
            "kind": "values",
            "max_abs_diff": float(difference.abs().max()),
            "relative_change": float(torch.linalg.vector_norm(difference)) / scale if scale > 0 else math.inf,
        }
    if type(a) is not type(b) or isinstance(a, torch.Tensor) or a != b:
        return {"kind": f"{_short_repr(a, 30)} -> {_short_repr(b, 30)}"}
    return None


# ---------------------------------------------------------------- formatting


def _overlapping(tensor: torch.Tensor) -> bool:
    """Whether the tensor has more elements than its storage holds (stride 0, expand)."""
    return tensor.numel() > tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _time(timestamp: float | None) -> str:
    return "-" if timestamp is None else datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())
