"""Damage a committed checkpoint in every part, many ways, and run every reader on each case.

python tests/scripts/fuzz_checkpoints.py OUT_DIR SEED CASES

Each case copies a pristine directory checkpoint (checkpoint_0.pt and commit.json), damages
one region of it (a zip record's bytes, a local header, the central directory, the manifest,
commit.json) by flipping, truncating, extending or swapping bytes, then runs load, verify,
inspect, diff, ls and find_latest. Allowed outcomes: load returns exactly the saved values or
raises a CheckpointError; each command exits 0, 1 or 2 without a traceback; find_latest
returns without raising; load and verify agree. The process runs under an address-space limit
and every case under an alarm, so a blow-up or a hang is a reported violation. Prints one
JSON line: {"cases": N, "outcomes": {...}, "violations": [...]}.
"""

import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import sys
import traceback
import zipfile

import torch

from core import CheckpointError, find_latest, make_sync_checkpointer
from core.cli import main as cli
from tests.helpers import bit_equal

CASE_SECONDS = 60
HEADROOM = 2 << 30


class CaseTimeout(BaseException):
    pass


def _state():
    g = torch.Generator().manual_seed(1)
    return {
        "model": {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g).bfloat16()},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(2000, generator=g), "step": torch.tensor(7)}}, "lr": 1e-3},
        "mask": torch.rand(300, generator=g) > 0.5,
        "step": 7,
        "names": ["a", "b"],
    }


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and bit_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _regions(folder):
    """(name, start, end) of every part of the checkpoint file worth damaging, and commit.json."""
    path = os.path.join(folder, "checkpoint_0.pt")
    reader = torch._C.PyTorchFileReader(path)
    regions = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            record = info.filename.split("/", 1)[1]
            start = reader.get_record_offset(record)
            regions.append((f"record:{record}", start, start + info.file_size))
            regions.append((f"header:{record}", info.header_offset, info.header_offset + 30 + len(info.filename)))
        regions.append(("central_directory", archive.start_dir, os.path.getsize(path)))
    regions.append(("commit.json", 0, os.path.getsize(os.path.join(folder, "commit.json"))))
    return [r for r in regions if r[2] > r[1]]


def _damage(rng, folder, region):
    name, start, end = region
    target = os.path.join(folder, "commit.json" if name == "commit.json" else "checkpoint_0.pt")
    with open(target, "rb") as f:
        data = bytearray(f.read())
    how = rng.choice(["flip", "flip", "flips", "truncate", "extend", "swap", "zero"])
    at = rng.randrange(start, end)
    if how == "flip":
        data[at] ^= 1 << rng.randrange(8)
    elif how == "flips":
        for _ in range(rng.randint(2, 8)):
            data[rng.randrange(start, end)] ^= rng.randrange(1, 256)
    elif how == "truncate":
        del data[at:]
    elif how == "extend":
        data[at:at] = os.urandom(rng.randint(1, 64))
    elif how == "swap":
        other = rng.randrange(start, end)
        width = rng.randint(1, 16)
        data[at : at + width], data[other : other + width] = data[other : other + width], data[at : at + width]
    else:
        data[at : at + rng.randint(1, 32)] = bytes(min(32, end - at))
    with open(target, "wb") as f:
        f.write(data)
    return f"{how} {name} @{at - start}"


def _command(*args):
    """Run a CLI command in-process: (exit code, output); any exception is a violation."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli([str(a) for a in args])
    return code, out.getvalue() + err.getvalue()


def _run_case(case_dir, pristine, saved, what, violations):
    outcome = "loaded"
    try:
        with make_sync_checkpointer() as ckpt:
            loaded = ckpt.load(case_dir)
        if not _same(saved, loaded):
            violations.append(f"{what}: load returned values other than the saved ones")
    except CheckpointError as exc:
        outcome = type(exc).__name__
    verified, said = _command("verify", case_dir)
    if verified not in (0, 1, 2) or "Traceback" in said:
        violations.append(f"{what}: verify exit {verified}: {said[-300:]}")
    if (verified == 0) != (outcome == "loaded"):
        violations.append(f"{what}: verify exit {verified} but load {outcome}: {said[-300:]}")
    for command in (("inspect", case_dir), ("diff", pristine, case_dir), ("ls", os.path.dirname(case_dir))):
        code, said = _command(*command)
        if code not in (0, 1, 2) or "Traceback" in said:
            violations.append(f"{what}: {command[0]} exit {code}: {said[-300:]}")
    find_latest(os.path.dirname(case_dir))
    return outcome


def main(out, seed, cases):
    rng = random.Random(seed)
    pristine = os.path.join(out, "pristine")
    saved = _state()
    with make_sync_checkpointer() as ckpt:
        ckpt.save(pristine, saved, step=7)
    regions = _regions(pristine)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        virtual = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (virtual + HEADROOM, hard))

    def alarm(signum, frame):
        raise CaseTimeout()

    signal.signal(signal.SIGALRM, alarm)
    outcomes, violations = {}, []
    for n in range(cases):
        case_root = os.path.join(out, f"case_{n}")
        case_dir = os.path.join(case_root, "ck")
        shutil.copytree(pristine, case_dir)
        what = f"case {n}: " + _damage(rng, case_dir, rng.choice(regions))
        signal.alarm(CASE_SECONDS)
        try:
            outcome = _run_case(case_dir, pristine, saved, what, violations)
        except CaseTimeout:
            outcome = "timeout"
            violations.append(f"{what}: took over {CASE_SECONDS} s")
        except BaseException as exc:  # MemoryError under the limit included
            outcome = type(exc).__name__
            violations.append(f"{what}: {type(exc).__name__}: {traceback.format_exc()[-600:]}")
        finally:
            signal.alarm(0)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(case_root)
    print(json.dumps({"cases": cases, "outcomes": outcomes, "violations": violations}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
