"""Trainer processes that tests kill, signal or fork: python tests/scripts/fault_scripts.py SCENARIO OUT_DIR."""

import os
import random
import signal
import sys
import threading
import time

import torch

from core import CheckpointerClosedError, WriterProcessDiedError, make_async_checkpointer
from tests.helpers import GatedCommit


def orphan(out: str) -> None:
    """Save, report, then wait to be SIGKILLed while the writer holds the commit (until OUT/gate exists)."""
    ckpt = make_async_checkpointer(commit_hook=GatedCommit(os.path.join(out, "reached"), os.path.join(out, "gate")))
    staged, _ = ckpt.save(os.path.join(out, "ck"), {"w": torch.full((1 << 20,), 7.0), "step": 7})
    staged.result()
    print(f"saved {ckpt.writer_pid}", flush=True)
    time.sleep(600)


def early_death(out: str) -> None:
    """One save right after the checkpointer is created (its writer is still starting); then the
    test SIGKILLs this process at once."""
    ckpt = make_async_checkpointer()
    staged, _ = ckpt.save(os.path.join(out, "ck"), {"w": torch.full((1 << 18,), 5.0), "step": 5})
    staged.result()
    print(f"saved {ckpt.writer_pid}", flush=True)
    time.sleep(600)


def fork(out: str) -> None:
    """A forked child must get a clear error from the parent's checkpointer; the parent is unaffected."""
    with make_async_checkpointer() as ckpt:
        ckpt.save(os.path.join(out, "before"), {"w": torch.ones(4)})[1].result()
        child = os.fork()
        if child == 0:
            try:
                ckpt.save(os.path.join(out, "child"), {"w": torch.zeros(4)})
                outcome = "saved"
            except CheckpointerClosedError as exc:
                outcome = "refused: " + str(exc)
            with open(os.path.join(out, "child_outcome"), "w") as f:
                f.write(outcome)
            os._exit(0)  # as a fork without exec ends; a normal exit must not touch the parent's writer either
        os.waitpid(child, 0)
        for step in range(3):
            ckpt.save(os.path.join(out, f"after_{step}"), {"w": torch.full((4,), float(step))})[1].result(timeout=120)
    print("parent done", flush=True)


def ctrl_c(out: str) -> None:
    """Saves in a loop while SIGINT arrives at random moments, one at a time. Every
    KeyboardInterrupt must come while its signal is outstanding (never deferred to a later save),
    and every write must still commit (the channel to the writer never breaks)."""
    outstanding = threading.Event()
    handled = threading.Event()
    main = threading.main_thread().ident

    def interrupter() -> None:
        rng = random.Random(0)
        for _ in range(40):
            time.sleep(rng.uniform(0.0, 0.03))
            outstanding.set()
            signal.pthread_kill(main, signal.SIGINT)
            handled.wait()
            handled.clear()

    weights = torch.randn(1 << 16)
    futures, deferred, interrupts = [], 0, 0
    with make_async_checkpointer() as ckpt:
        for _ in range(3):  # the writer is up and the slab faulted in: interrupts land in steady saves
            ckpt.save(os.path.join(out, "warm"), {"w": weights, "step": -1})[1].result()
        thread = threading.Thread(target=interrupter, daemon=True)
        thread.start()
        step = 0
        while True:
            try:  # a Ctrl-C may land anywhere in the loop, the loop's own test included
                if not thread.is_alive() and not outstanding.is_set():
                    break
                weights.add_(1)
                staged, written = ckpt.save(os.path.join(out, f"slot{step % 4}"), {"w": weights, "step": step})
                futures.append(written)
                step += 1
            except KeyboardInterrupt:
                interrupts += 1
                if not outstanding.is_set():
                    deferred += 1
                outstanding.clear()
                handled.set()
        thread.join()
        died = 0
        for written in futures:
            try:
                written.result(timeout=120)
            except WriterProcessDiedError:
                died += 1
    print(f"interrupts={interrupts} deferred={deferred} died={died} saves={len(futures)}", flush=True)


def _held_commit(out: str) -> GatedCommit:
    """Commits wait until the test opens OUT/gate (it does once SIGTERM's drain has begun)."""
    return GatedCommit(os.path.join(out, "reached"), os.path.join(out, "gate"))


def sigterm(out: str) -> None:
    """A user SIGTERM handler, then a checkpointer; a pending write when SIGTERM comes."""

    def user_handler(signum, frame):
        with open(os.path.join(out, "user_handler_ran"), "w") as f:
            f.write(str(os.path.exists(os.path.join(out, "ck", "checkpoint_0.pt"))))
        sys.exit(0)

    signal.signal(signal.SIGTERM, user_handler)
    ckpt = make_async_checkpointer(commit_hook=_held_commit(out))
    ckpt.save(os.path.join(out, "ck"), {"w": torch.full((1 << 20,), 3.0)})[0].result()
    print("saved", flush=True)
    time.sleep(600)


def accelerate_sigterm(out: str) -> None:
    """As sigterm(), for an Accelerate checkpoint folder that is published after its files."""
    from accelerate_ckpt import enable_async_checkpointing
    from tests.accelerate_helpers import setup

    def user_handler(signum, frame):
        target = os.path.join(out, "ckpt")
        with open(os.path.join(out, "user_handler_ran"), "w") as f:
            f.write(str(sorted(os.listdir(target)) if os.path.isdir(target) else []))
        sys.exit(0)

    signal.signal(signal.SIGTERM, user_handler)
    accelerator, *_ = setup()
    enable_async_checkpointing(accelerator, commit_hook=_held_commit(out))
    accelerator.save_state(os.path.join(out, "ckpt"))
    print("saved", flush=True)
    time.sleep(600)


def crash_before_commit(out: str) -> None:
    """Two committed checkpoints with retention's latest pointer, then a third whose commit is
    held (its file written and fsynced) when the test kills trainer and writer together."""
    from core import CheckpointerConfig, CheckpointWriterConfig, RetentionConfig

    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(retention=RetentionConfig()))
    with make_async_checkpointer(config) as ckpt:
        for step in (1, 2):
            ckpt.save(os.path.join(out, f"step_{step}"), {"w": torch.full((1000,), float(step))}, step=step)
    hook = GatedCommit(os.path.join(out, "reached"), os.path.join(out, "never"))
    ckpt = make_async_checkpointer(config, commit_hook=hook)
    ckpt.save(os.path.join(out, "step_3"), {"w": torch.full((1000,), 3.0)}, step=3)[0].result()
    print("pending", flush=True)  # the test waits for OUT/reached, then kills us
    time.sleep(600)


if __name__ == "__main__":
    scenarios = {
        f.__name__: f for f in (orphan, early_death, fork, ctrl_c, sigterm, accelerate_sigterm, crash_before_commit)
    }
    scenarios[sys.argv[1]](sys.argv[2])
