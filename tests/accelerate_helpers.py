"""Real Accelerator set-ups for the adapter tests."""

import random

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed


class Counter:
    """A registered custom object, as in accelerator.register_for_checkpointing(obj)."""

    def __init__(self):
        self.value = 0
        self.history = []

    def state_dict(self):
        return {"value": self.value, "history": list(self.history)}

    def load_state_dict(self, state):
        self.value = state["value"]
        self.history = list(state["history"])


def setup(project_dir=None, n_models=1, **project_kwargs):
    set_seed(0)
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=project_dir, **project_kwargs))
    models = [
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)) for _ in range(n_models)
    ]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9) for o in optimizers]
    prepared = accelerator.prepare(*models, *optimizers, *schedulers)
    models, optimizers, schedulers = (
        list(prepared[:n_models]),
        list(prepared[n_models : 2 * n_models]),
        list(prepared[2 * n_models :]),
    )
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, models, optimizers, schedulers, counter


def train(accelerator, models, optimizers, schedulers, counter, steps=2):
    for _ in range(steps):
        for model, optimizer, scheduler in zip(models, optimizers, schedulers):
            accelerator.backward(model(torch.randn(4, 6)).pow(2).mean())
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        counter.value += 1
        counter.history.append(random.random())


def snapshot(models, optimizers, schedulers, counter):
    """Everything save_state covers, copied, plus the next draws of every RNG."""
    state = {
        "models": [{k: v.clone() for k, v in m.state_dict().items()} for m in models],
        "optimizers": [torch.optim.Optimizer.state_dict(o.optimizer) for o in optimizers],
        "schedulers": [s.scheduler.state_dict() for s in schedulers],
        "counter": counter.state_dict(),
    }
    return state


def next_draws():
    return (random.random(), float(np.random.rand()), torch.rand(3))
