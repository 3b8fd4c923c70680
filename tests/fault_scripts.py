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


def crash_before_commit(out: str) -> None:
    """Two committed checkpoints with retention's latest pointer, then a third whose commit is
    pending (its file written and fsynced) when the test kills trainer and writer together."""
    from core import CheckpointerConfig, CheckpointWriterConfig, RetentionConfig

    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(retention=RetentionConfig()))
    with make_async_checkpointer(config) as ckpt:
        for step in (1, 2):
            ckpt.save(os.path.join(out, f"step_{step}"), {"w": torch.full((1000,), float(step))}, step=step)
    ckpt = make_async_checkpointer(config, commit_hook=SlowCommit(60))
    ckpt.save(os.path.join(out, "step_3"), {"w": torch.full((1000,), 3.0)}, step=3)[0].result()
    print("pending", flush=True)  # the test waits for the written temporary file, then kills us
    time.sleep(60)


if __name__ == "__main__":
    scenarios = {"orphan": orphan, "sigterm": sigterm, "accelerate_sigterm": accelerate_sigterm,
                 "crash_before_commit": crash_before_commit}
    scenarios[sys.argv[1]](sys.argv[2])
