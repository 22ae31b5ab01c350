"""The population estimator (zo_objectives.population): each member's loss from the one batched pass equals the
loss of the model with its perturbation written into the weights; the update is exact (lr 0, exceptions, replay,
resume, bf16 rounding) and points along the gradient; PopulationObjective scores every kind of objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_small_lm

from metrics import get_metric
from zo_objectives.objectives import CrossEntropy, MetricObjective, RewardObjective
from zo_objectives.population import Population, PopulationObjective, replay
from zo_objectives.scoring import GenerationPredictor, LabelWordPredictor

VOCAB = 100
IDS = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))


def lm(dtype: torch.dtype = torch.float32, tie: bool = True) -> torch.nn.Module:
    model = build_small_lm(VOCAB, tie=tie).to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def member_losses(model: torch.nn.Module, members: int, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Next-token cross-entropy of each member's copy of ``ids`` (rows grouped by member)."""
    x = ids.repeat(members, 1)
    logits = model(input_ids=x).logits.float()
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="none")
    return losses.view(members, -1).mean(1)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8) if x.dtype != torch.uint8 else x, y.view(torch.uint8)) for x, y in
               zip(a, b))


def materialized(opt: Population, model: torch.nn.Module, seed: int, sign: float) -> None:
    """Write W + sign * eps * A B^T / sqrt(r) (vectors: + sign * eps * z) into the weights."""
    with torch.no_grad():
        for index, p, _ in opt._params():
            a, b = opt._factors(seed, index, p)
            delta = a @ b.T / math.sqrt(opt.perturbation_rank) if b is not None else a[:, 0]
            p.add_(delta.view_as(p), alpha=sign * opt.eps)


@pytest.mark.parametrize("rank,tie", [(1, True), (3, False)])
def test_member_losses_equal_materialized_perturbations(rank, tie):
    model = lm(tie=tie)
    opt = Population(model.parameters(), lr=0.0, eps=1e-2, population=6, perturbation_rank=rank, seed=1)
    seeds = [11, 22, 33]
    batched = opt.score(lambda: member_losses(model, 6), seeds)
    base = weights(model)
    for i in range(6):
        materialized(opt, model, seeds[i // 2], 1.0 - 2 * (i % 2))
        with torch.no_grad():
            alone = float(member_losses(model, 1)[0])
        with torch.no_grad():
            for p, w in zip(model.parameters(), base):
                p.copy_(w)
        assert batched[i] == pytest.approx(alone, abs=2e-5)
    assert len(set(batched)) == 6  # every member saw its own perturbation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lr_zero_and_exceptions_leave_weights_bitwise(dtype):
    model = lm(dtype)
    base = weights(model)
    opt = Population(model.parameters(), lr=0.0, eps=1e-2, population=4, perturbation_rank=2)
    opt.step(lambda: member_losses(model, 4))
    assert same(weights(model), base)
    opt = Population(model.parameters(), lr=1e-2, eps=1e-2, population=4)

    def fails():
        member_losses(model, 4)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(fails)
    assert same(weights(model), base) and not opt.trajectory
    norm = model.model.norm
    assert isinstance(norm.weight, torch.nn.Parameter) and norm.weight.shape == (32,)  # swapped weights put back
    opt.step(lambda: member_losses(model, 4))
    assert not same(weights(model), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_and_resume_are_bitwise(dtype):
    model = lm(dtype)
    base = weights(model)
    settings = dict(lr=1e-2, eps=1e-2, population=4, perturbation_rank=2, seed=5, weight_decay=0.1)
    opt = Population(model.parameters(), **settings)
    for _ in range(3):
        opt.step(lambda: member_losses(model, 4))
    tuned, state = weights(model), opt.state_dict()
    assert state["mezo"]["population"] == 4 and len(state["mezo"]["trajectory"]) == 3

    other = lm(dtype)
    replayed = replay(list(other.parameters()), state)
    assert same(weights(other), tuned) and replayed.num_perturbations_done == opt.num_perturbations_done

    resumed = lm(dtype)  # two steps, then a replay of them, then the third step
    first = Population(resumed.parameters(), **settings)
    for _ in range(2):
        first.step(lambda: member_losses(resumed, 4))
    again = lm(dtype)
    assert same(weights(again), base)
    cont = replay(list(again.parameters()), first.state_dict())
    cont.step(lambda: member_losses(again, 4))
    assert same(weights(again), tuned)


def test_bf16_update_rounds_to_a_neighbour_of_the_fp32_update():
    """Each bf16 weight lands on one of the two bf16 values around its fp32 update (stochastic rounding), and
    the rounding goes both ways."""
    model = lm(torch.bfloat16)
    wide = lm(torch.bfloat16).float()
    record = {"seeds": [3, 4], "grads": [0.7, -1.3], "loss": 0.0, "lrs": [1e-3]}
    for m in (model, wide):
        Population(m.parameters(), lr=1e-3, population=4, perturbation_rank=2).replay_record(dict(record))
    ups = downs = 0
    for p, q in zip(model.parameters(), wide.parameters()):
        exact, got = q.detach(), p.detach().float()
        low = exact.bfloat16().float()
        low = torch.where(low > exact, torch.nextafter(low.bfloat16(), torch.tensor(-math.inf, dtype=torch.bfloat16))
                          .float(), low)
        high = torch.nextafter(low.bfloat16(), torch.tensor(math.inf, dtype=torch.bfloat16)).float()
        on_grid = exact == low
        assert torch.all((got == low) | ((got == high) & ~on_grid))
        ups, downs = ups + int(((got == high) & ~on_grid).sum()), downs + int(((got == low) & ~on_grid).sum())
    assert ups > 100 and downs > 100


def test_update_agrees_with_the_gradient():
    """The mean cosine between the step's move and -grad over a few steps is clearly positive."""
    model = lm(torch.float64, tie=False)
    cosines = []
    for step in range(8):
        loss = member_losses(model, 1)[0]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        before = weights(model)
        opt = Population(model.parameters(), lr=1e-3, eps=1e-4, population=32, perturbation_rank=2, seed=step)
        opt.step(lambda: member_losses(model, 32))
        move = torch.cat([(p.detach() - w).view(-1) for p, w in zip(model.parameters(), before)])
        grad = torch.cat([g.view(-1) for g in grads])
        cosines.append(float(F.cosine_similarity(move, -grad, dim=0)))
        with torch.no_grad():
            for p, w in zip(model.parameters(), before):
                p.copy_(w)
    assert sum(cosines) / len(cosines) > 0.02  # random directions in ~60k dimensions: |cos| ~ 0.004


def test_settings_and_closures_are_checked():
    model = lm()
    for bad in ({"population": 3}, {"population": 0}, {"perturbation_rank": 0}, {"population": True}):
        with pytest.raises(ValueError, match="population|perturbation_rank"):
            Population(model.parameters(), **bad)
    opt = Population(model.parameters(), population=4)
    with pytest.raises(ValueError, match="returned 1 losses for 4 members"):
        opt.step(lambda: [1.0])
    with pytest.raises(ValueError, match="cannot hold 4 members"):
        opt.step(lambda: member_losses(model, 3).tolist() + [0.0])


def _materialized_objective(opt, model, objective, batch, seeds):
    base, out = weights(model), []
    for i in range(2 * len(seeds)):
        materialized(opt, model, seeds[i // 2], 1.0 - 2 * (i % 2))
        out.append(float(objective(model, batch)))
        with torch.no_grad():
            for p, w in zip(model.parameters(), base):
                p.copy_(w)
    return out


def test_population_objective_scores_metric_cross_entropy_and_reward(tokenizer, small_lm):
    for p in small_lm.parameters():
        p.requires_grad_(True)
    labels = LabelWordPredictor(tokenizer, [" bad", " good"])
    batch = [{"prompt": "A fine film. It was", "label": 1}, {"prompt": "Dull and long, so long. It was", "label": 0},
             {"prompt": "Yes", "label": 1}]
    generator = GenerationPredictor(tokenizer, max_new_tokens=4)
    gen_batch = [{"prompt": "Q: capital of France? A:", "answers": ["Paris"], "target": " Paris"},
                 {"prompt": "Q: two plus two, written out? A:", "answers": ["four"], "target": " four"}]

    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    cases = [(MetricObjective(get_metric("accuracy"), labels), batch), (CrossEntropy(labels), batch),
             (CrossEntropy(generator), gen_batch), (RewardObjective(generator, length), gen_batch)]
    opt = Population(small_lm.parameters(), eps=0.05, population=4, perturbation_rank=2)
    seeds = [7, 8]
    for objective, data in cases:
        members = PopulationObjective(objective, 4)
        batched = opt.score(lambda m=members, d=data: m(small_lm, d), seeds)
        alone = _materialized_objective(opt, small_lm, objective, data, seeds)
        assert batched == pytest.approx(alone, abs=1e-4), type(objective).__name__
