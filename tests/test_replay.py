"""replay() writes nothing it has not checked: the base weights (every state_dict() carries their checksum), every
record's numbers, before the first weight is written (issue 35)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from zo_objectives import MeZO, Population, replay
from zo_objectives.estimators import FZOO


def linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 4)


def quadratic(model: torch.nn.Linear):
    return lambda: float(model(torch.ones(2, 6)).pow(2).sum())


def trained(steps: int = 3) -> tuple[torch.nn.Linear, dict]:
    model = linear()
    opt = MeZO(model.parameters(), lr=1e-2, noise="gaussian", seed=1)
    for _ in range(steps):
        opt.step(quadratic(model))
    return model, opt.state_dict()


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("make", [
    lambda params: MeZO(params, lr=1e-2, noise="gaussian", seed=1),
    lambda params: Population(params, lr=1e-2, population=2, seed=1),
])
def test_a_state_dict_carries_the_base_checksum_and_replay_refuses_other_weights(make):
    model = linear()
    opt = make(model.parameters())
    assert opt.state_dict()["mezo"]["base_sha256"] is None  # no step yet: no base
    if isinstance(opt, Population):
        opt.step(lambda: model(torch.ones(2, 6)).pow(2).sum(1).tolist())  # one row per member
    else:
        opt.step(quadratic(model))
    state = opt.state_dict()
    assert state["mezo"]["base_sha256"]
    other = linear(seed=5)  # same shapes, other weights
    before = snapshot(other)
    with pytest.raises(ValueError, match="do not hold the base weights the state was made from"):
        replay(list(other.parameters()), state)
    assert unchanged(other, before)
    fresh = linear()
    resumed = replay(list(fresh.parameters()), state)
    assert unchanged(fresh, snapshot(model)) and resumed.state_dict()["mezo"]["base_sha256"] == state["mezo"][
        "base_sha256"]


@pytest.mark.parametrize("damage, field", [
    (lambda r: r.update(grads=[math.nan]), "gradient"),
    (lambda r: r.update(lrs=[math.inf]), "lr"),
    (lambda r: r.pop("grads"), "malformed"),
    (lambda r: r.update(seeds=["x"]), "malformed"),
])
def test_a_bad_record_anywhere_is_refused_before_any_weight_is_written(damage, field):
    _, state = trained()
    state = copy.deepcopy(state)
    damage(state["mezo"]["trajectory"][-1])  # the last record: the first two would replay fine
    fresh = linear()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=f"non-finite or malformed {'gradient or lr' if field else ''}.*record 2"):
        replay(list(fresh.parameters()), state)
    assert unchanged(fresh, before)


def test_fzoo_state_dicts_carry_the_base_too():
    model = linear()
    opt = FZOO(model.parameters(), lr=1e-3, n_perturbations=2, seed=1)
    opt.step(lambda: model(torch.ones(3, 6)).pow(2).sum(1).tolist())  # one row per member
    assert opt.state_dict()["mezo"]["base_sha256"]
