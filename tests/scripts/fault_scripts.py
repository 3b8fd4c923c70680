"""Trainer processes that tests kill, signal or fork: python tests/scripts/fault_scripts.py SCENARIO OUT_DIR."""

import os
import random
import shutil
import signal
import sys
import threading
import time
import types

import torch

from core import CheckpointerClosedError, WriterProcessDiedError, make_async_checkpointer
from core.interrupts import InterruptSafeEvent
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


INTERRUPTS = 100  # (the ctrl_c test checks this many came)


def ctrl_c(out: str) -> None:
    """Saves in a loop while SIGINT arrives, one at a time, each soon after a save() has begun (so
    that, however busy the machine, it lands in that save or just after it). Every
    KeyboardInterrupt must come while its signal is outstanding (never deferred to a later save),
    and every write must still commit (the channel to the writer never breaks). Every 8th save is
    waited for, so that interrupts land in waits too. (The main thread's own events are ones a
    Ctrl-C cannot leave locked: threading.Event's can be, which once hung this scenario.)"""
    outstanding = InterruptSafeEvent()
    handled = InterruptSafeEvent()
    saving = InterruptSafeEvent()
    main = threading.main_thread().ident

    def interrupter() -> None:
        rng = random.Random(0)
        for _ in range(INTERRUPTS):
            saving.wait()
            time.sleep(rng.uniform(0.0, 0.002))
            outstanding.set()
            signal.pthread_kill(main, signal.SIGINT)
            handled.wait()
            handled.clear()

    weights = torch.randn(1 << 16)
    futures, deferred, interrupts, in_save = [], 0, 0, 0
    with make_async_checkpointer() as ckpt:
        for _ in range(3):  # the writer is up and the slab faulted in: interrupts land in steady saves
            ckpt.save(os.path.join(out, "warm"), {"w": weights, "step": -1})[1].result()
        thread = threading.Thread(target=interrupter, daemon=True)
        thread.start()
        step = 0
        inside = False
        while True:
            try:  # a Ctrl-C may land anywhere in the loop, the loop's own test included
                if not thread.is_alive() and not outstanding.is_set():
                    break
                weights.add_(1)
                inside = True
                saving.set()
                staged, written = ckpt.save(os.path.join(out, f"slot{step % 4}"), {"w": weights, "step": step})
                futures.append(written)
                if step % 8 == 0:
                    written.result()
                inside = False
                saving.clear()
                step += 1
            except KeyboardInterrupt:
                interrupts += 1
                in_save += inside
                inside = False
                saving.clear()
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
        # wait() gives back the slabs lent while the writer was behind (they linger otherwise); one
        # more save tells the writer which slabs are gone; then count what it holds open.
        ckpt.wait()
        ckpt.save(os.path.join(out, "last"), {"w": weights, "step": step})[1].result()
        writer_fds = len(os.listdir(f"/proc/{ckpt.writer_pid}/fd"))
    print(
        f"interrupts={interrupts} deferred={deferred} died={died} saves={len(futures)} in_save={in_save} "
        f"writer_fds={writer_fds}",
        flush=True,
    )


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


def accelerate_killed_before_publish(out: str) -> None:
    """Automatic naming: checkpoint_0 complete, then checkpoint_1 saved with its commit held;
    the test SIGKILLs trainer and writer together once its files are written."""
    from accelerate_ckpt import enable_async_checkpointing
    from tests.accelerate_helpers import setup

    accelerator, *_ = setup(project_dir=out, automatic_checkpoint_naming=True)
    handle = enable_async_checkpointing(accelerator)
    accelerator.save_state()
    handle.close()
    enable_async_checkpointing(accelerator, commit_hook=GatedCommit(os.path.join(out, "reached"), "/never"))
    accelerator.save_state()
    print("pending", flush=True)
    time.sleep(600)


def accelerate_killed_mid_publish(out: str) -> None:
    """A save into an existing checkpoint folder whose process dies after publishing its first
    file: the folder mixes two saves."""
    import accelerate_ckpt.publish
    from accelerate_ckpt import enable_async_checkpointing
    from tests.accelerate_helpers import setup, train

    accelerator, models, optimizers, schedulers, counter = setup()
    with enable_async_checkpointing(accelerator):
        accelerator.save_state(os.path.join(out, "ck"))
    train(accelerator, models, optimizers, schedulers, counter)

    def merge_one_then_die(source: str, target: str) -> list:
        name = sorted(os.listdir(source))[0]
        os.replace(os.path.join(source, name), os.path.join(target, name))
        os.kill(os.getpid(), signal.SIGKILL)
        return []

    accelerate_ckpt.publish._merge = merge_one_then_die
    handle = enable_async_checkpointing(accelerator)
    accelerator.save_state(os.path.join(out, "ck"))
    handle.wait()


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


def killed_during_retention(out: str) -> None:
    """Retention moves step_0 out of sight, then this process is SIGKILLed before removing it."""
    import core.retention
    from core import CheckpointerConfig, CheckpointWriterConfig, RetentionConfig, make_sync_checkpointer

    def die(path: str) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    core.retention.shutil = types.SimpleNamespace(rmtree=die)  # retention's own removal only
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(retention=RetentionConfig(keep_last=1)))
    with make_sync_checkpointer(config) as ckpt:
        for step in range(2):
            ckpt.save(os.path.join(out, f"step_{step}"), {"w": torch.full((1 << 16,), float(step))}, step=step)


def _leave_free(folder: str, nbytes: int) -> None:
    """Fill the filesystem of `folder` until about `nbytes` (a multiple of its block size) stay free."""
    filler = os.path.join(folder, "filler")
    if os.path.exists(filler):
        os.unlink(filler)
    stats = os.statvfs(folder)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(stats.f_bavail * stats.f_frsize - nbytes, 0))


def disk_full_levels(out: str) -> None:
    """On a small filesystem, save with 0 to 44 KiB free: each save, sync and async, must fail
    with a CheckpointWriteError for ENOSPC naming the file; the process lives; the previous
    checkpoint there still loads; nothing of the failed save is left. One line per save."""
    import errno

    from core import CheckpointWriteError, make_sync_checkpointer

    state = {"w": torch.ones(64 << 10), "step": 2}  # 256 KiB
    with make_async_checkpointer() as background, make_sync_checkpointer() as foreground:
        for free in range(0, 48 << 10, 4 << 10):
            for kind, ckpt in (("sync", foreground), ("async", background)):
                ck = os.path.join(out, "ck")
                shutil.rmtree(ck, ignore_errors=True)
                _leave_free(out, 1 << 20)
                foreground.save(ck, {"w": torch.ones(4), "step": 1})
                _leave_free(out, free)
                try:
                    if kind == "sync":
                        ckpt.save(ck, state)
                    else:
                        ckpt.save(ck, state)[1].result()
                    outcome = "saved"
                except CheckpointWriteError as exc:
                    named = os.path.join(ck, "checkpoint_0.pt") in str(exc)
                    outcome = "ENOSPC ok" if exc.errno == errno.ENOSPC and named else f"wrong error: {exc}"
                left = sorted(os.listdir(ck))
                if foreground.load(ck)["step"] != 1 or left != ["checkpoint_0.pt", "commit.json"]:
                    outcome = f"previous checkpoint damaged or leftovers: {left}"
                print(f"{kind} free={free} {outcome}", flush=True)


if __name__ == "__main__":
    scenarios = {
        f.__name__: f
        for f in (
            orphan,
            early_death,
            fork,
            ctrl_c,
            sigterm,
            accelerate_sigterm,
            crash_before_commit,
            accelerate_killed_before_publish,
            accelerate_killed_mid_publish,
            killed_during_retention,
            disk_full_levels,
        )
    }
    # A trainer gets Ctrl-C as an interactive one does, however the suite was started (a shell
    # script's background job inherits SIGINT ignored, and Python then leaves it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    scenarios[sys.argv[1]](sys.argv[2])
