"""The plan cache reuses a pickle only when torch.save would write the very same one."""

from collections import OrderedDict

import pytest
import torch

from core.capture import capture
from core.plan_cache import MAX_TEMPLATE_SLOTS, PlanCache


def _base():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    return {
        "model": OrderedDict(weight=weight, bias=torch.zeros(4), view=weight.detach()[1:, :2]),
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, 4)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
        },
        "epoch": 1,
        "name": "run",
        "flag": False,
        "none": None,
        "loss": 0.0,
    }


def _replace(path, value=None, transform=None):
    def change(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = transform(target[path[-1]]) if transform else value
        return state

    return change


def _share_the_name(state):
    state["other_name"] = state["name"]
    return state


def _equal_but_distinct_name(state):
    state["other_name"] = "".join(["r", "un"])
    return state


def _with_metadata(version):
    def change(state):
        state["model"]._metadata = OrderedDict({"": {"version": version}})
        return state

    return change


def _tie(state):
    state["model"]["bias"] = state["model"]["weight"].detach()[0]
    return state


VARIANTS = {
    "same values": lambda s: s,
    "tensor values changed in place": lambda s: (s["model"]["bias"].add_(1), s)[1],
    "int changed": _replace(("epoch",), 2),
    "int became bool": _replace(("epoch",), True),
    "bool became int": _replace(("flag",), 0),
    "float sign of zero": _replace(("loss",), -0.0),
    "float changed": _replace(("optimizer", "param_groups", 0, "lr"), transform=lambda lr: lr / 2),
    "tuple became list": _replace(("optimizer", "param_groups", 0, "betas"), transform=list),
    "string changed": _replace(("name",), "run2"),
    "int became string": _replace(("epoch",), "1"),
    "string became None": _replace(("name",), None),
    "key renamed": lambda s: {("renamed" if k == "name" else k): v for k, v in s.items()},
    "one string object twice": _share_the_name,
    "two equal string objects": _equal_but_distinct_name,
    "new key": _replace(("extra",), 1),
    "dict became OrderedDict": _replace(("optimizer", "state", 0), transform=OrderedDict),
    "OrderedDict got its _metadata": _with_metadata(1),
    "view moved": lambda s: _replace(("model", "view"), s["model"]["weight"].detach()[:3, 2:])(s),
    "tied to the weight": _tie,
    "dtype changed": _replace(("model", "bias"), transform=lambda t: t.double()),
    "requires_grad changed": _replace(("model", "bias"), transform=lambda t: t.detach().requires_grad_(True)),
    "parameter became tensor": _replace(("model", "weight"), transform=lambda p: p.detach()),
    "tensor replaced by a new one": _replace(("model", "bias"), transform=lambda t: t.clone()),
    "custom object": _replace(("extra",), torch.nn.Identity()),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_capture_equals_a_fresh_capture(variant):
    cache = PlanCache()
    state = _base()
    first = cache.capture(state)
    changed = VARIANTS[variant](state)
    for _ in range(2):  # the variant's first capture, then a hit on it
        cached = cache.capture(changed)
        fresh = capture(changed)
        assert cached.plan.structure == fresh.plan.structure
        assert cached.plan.storages == fresh.plan.storages
        assert [(s.data_ptr(), s.numel()) for s in cached.sources] == [(s.data_ptr(), s.numel()) for s in fresh.sources]
    if variant in ("same values", "tensor values changed in place"):
        assert cached.plan.structure is first.plan.structure, "an unchanged skeleton was pickled again"


def test_several_state_dicts_saved_in_turn_all_hit():
    cache = PlanCache(entries=3)
    states = [_replace(("part",), (1,) * n)(_base()) for n in range(3)]  # three different skeletons
    first = [cache.capture(state).plan.structure for state in states]
    for _ in range(2):
        again = [cache.capture(state).plan.structure for state in states]
        assert all(a is b for a, b in zip(again, first)), "a state dict saved in turn was pickled again"
    for state in states:
        assert cache.capture(state).plan.structure == capture(state).plan.structure


def test_a_state_that_changes_every_save_is_still_captured_right_when_its_walk_is_skipped():
    cache = PlanCache(entries=2)
    for step in range(20):  # misses every time: after two, most walks are skipped
        state = _replace(("epoch",), step)(_base())
        assert cache.capture(state).plan.structure == capture(state).plan.structure
    state = _base()
    hits = [cache.capture(state).plan.structure for _ in range(20)]
    assert hits[-1] is hits[-2], "a state that stopped changing is never cached again"
    assert all(h == capture(state).plan.structure for h in hits)


@pytest.mark.parametrize("base", [_base, lambda: _with_metadata(1)(_base())], ids=["plain", "with _metadata"])
def test_numbers_and_strings_that_change_every_save_fill_the_cached_pickle_instead_of_pickling_again(base):
    cache = PlanCache()
    first = cache.capture(base())
    changes = [
        _replace(("epoch",), 300),  # another opcode's width
        _replace(("epoch",), -(2**40)),
        _replace(("epoch",), 2**70),
        _replace(("loss",), float("nan")),
        _replace(("flag",), None),
        _replace(("none",), 2.5),
        _replace(("optimizer", "param_groups", 0, "params", 0), 7),
        _replace(("optimizer", "param_groups", 0, "betas"), (0.5, True)),
        _replace(("name",), "epoch=0-step=12.ckpt"),  # (Lightning's checkpoint paths name the step)
        _replace(("name",), "ünïcødé \udc80 " * 40),  # (over 255 bytes, and a lone surrogate)
        lambda s: {("epoch=3.ckpt" if k == "name" else k): v for k, v in s.items()},  # a key
    ]
    if "_metadata" in vars(base()["model"]):
        changes.append(_with_metadata(2))
    for change in changes:
        state = change(base())
        cached = cache.capture(state)
        assert cached.plan.structure == capture(state).plan.structure
        assert cached.memo is first.memo, "the state was pickled again instead of filling the cached pickle"


@pytest.mark.parametrize("words", [800, 50_000], ids=["a template of 1,600 slots", "too many slots for one"])
def test_a_state_with_a_large_vocabulary_is_captured_right_and_its_template_made_in_one_pass(words):
    # (Finding each marker with its own scan of the pickle took minutes for 100,000 slots.)
    cache = PlanCache()
    vocabulary = {f"token_{i}": i for i in range(words)}
    model = {"w": torch.zeros(4)}
    first = None
    for step in range(3):
        state = {"model": model, "vocabulary": vocabulary, "step": step, "path": f"step={step}.pt"}
        cached = cache.capture(state)
        assert cached.plan.structure == capture(state).plan.structure
        first = first or cached
    assert (cached.memo is first.memo) == (2 * words <= MAX_TEMPLATE_SLOTS), "the template was not used"
