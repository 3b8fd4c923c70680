"""Trainer processes that tests kill or signal: python tests/fault_scripts.py SCENARIO OUT_DIR."""

import os
import signal
import sys
import time

import torch

from core import make_async_checkpointer
from tests.helpers import SlowCommit


def orphan(out: str) -> None:
    """Save, report, then wait to be SIGKILLed while the writer is still committing."""
    ckpt = make_async_checkpointer(commit_hook=SlowCommit(1.5))
    ckpt.save(os.path.join(out, "warm"), {"w": torch.zeros(4)})[1].result()  # the writer is running
    staged, _ = ckpt.save(os.path.join(out, "ck"), {"w": torch.full((1 << 20,), 7.0), "step": 7})
    staged.result()
    print(f"saved {ckpt._process.pid}", flush=True)
    time.sleep(60)


def sigterm(out: str) -> None:
    """A user SIGTERM handler, then a checkpointer; a pending slow write when SIGTERM comes."""

    def user_handler(signum, frame):
        with open(os.path.join(out, "user_handler_ran"), "w") as f:
            f.write(str(os.path.exists(os.path.join(out, "ck", "checkpoint_0.pt"))))
        sys.exit(0)

    signal.signal(signal.SIGTERM, user_handler)
    ckpt = make_async_checkpointer(commit_hook=SlowCommit(1.5))
    ckpt.save(os.path.join(out, "ck"), {"w": torch.full((1 << 20,), 3.0)})[0].result()
    print("saved", flush=True)
    time.sleep(60)


def accelerate_sigterm(out: str) -> None:
    """As sigterm(), for an Accelerate checkpoint folder that is published after its files."""
    from accelerate_ckpt import enable_async_checkpointing
    from tests.accelerate_helpers import setup

    def user_handler(signum, frame):
        with open(os.path.join(out, "user_handler_ran"), "w") as f:
            f.write(str(sorted(os.listdir(os.path.join(out, "ckpt"))) if os.path.isdir(os.path.join(out, "ckpt")) else []))
        sys.exit(0)

    signal.signal(signal.SIGTERM, user_handler)
    accelerator, *_ = setup()
    enable_async_checkpointing(accelerator, commit_hook=SlowCommit(0.5))
    accelerator.save_state(os.path.join(out, "ckpt"))
    print("saved", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    {"orphan": orphan, "sigterm": sigterm, "accelerate_sigterm": accelerate_sigterm}[sys.argv[1]](sys.argv[2])
