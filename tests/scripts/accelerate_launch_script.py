"""Run under `accelerate launch --num_processes 2 --cpu`: each rank saves and restores its RNG state."""

import os
import sys

import torch

from accelerate_ckpt import enable_async_checkpointing
from tests.accelerate_helpers import next_draws, setup, train


def main() -> None:
    out = sys.argv[1]
    accelerator, models, optimizers, schedulers, counter = setup()
    assert accelerator.num_processes == 2, accelerator.num_processes
    torch.manual_seed(100 + accelerator.process_index)  # different RNG streams per rank
    handle = enable_async_checkpointing(accelerator)
    train(accelerator, models, optimizers, schedulers, counter)
    accelerator.save_state(os.path.join(out, "ckpt"))
    expected = next_draws()
    train(accelerator, models, optimizers, schedulers, counter)
    accelerator.load_state(os.path.join(out, "ckpt"))
    got = next_draws()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2]), (got, expected)
    open(os.path.join(out, f"rng_ok_{accelerator.process_index}"), "w").close()
    accelerator.end_training()
    handle.close()


if __name__ == "__main__":
    main()
