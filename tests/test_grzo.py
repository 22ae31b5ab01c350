"""GRZO (zo_objectives.estimators.grzo) and PerExampleObjective: each example's pair of losses from the one batched
pass equals that example's loss with its own perturbation written into the weights; the step is the published rule
(differences divided by their spread), exact (lr 0, exceptions, replay, resume), points along the gradient, and
trains from the library and the CLI."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import build_small_lm, killed_then_resumed, objective_cases

from metrics import get_metric
from zo_objectives.checkpoint import replay
from zo_objectives.estimators.grzo import GRZO
from zo_objectives.objectives import (
    CrossEntropy,
    MetricObjective,
    Objective,
    PerExampleObjective,
    RewardObjective,
    WeightedSum,
    candidate_logits,
)
from zo_objectives.scoring import GenerationPredictor, LabelWordPredictor

VOCAB = 100
IDS = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))  # 3 examples
CHUNK = 1000


def lm(dtype: torch.dtype = torch.float32, tie: bool = True) -> torch.nn.Module:
    model = build_small_lm(VOCAB, tie=tie).to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def pair_losses(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Next-token cross-entropy of each example, twice (members 2k and 2k + 1: example k), one batched pass."""
    x = ids.repeat_interleave(2, 0)
    logits = model(input_ids=x).logits
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="none")
    return losses.view(x.shape[0], -1).mean(1)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def direction(opt: GRZO, seed: int, index: int, p: torch.Tensor) -> torch.Tensor:
    """z of one tensor for one seed, shaped like it: A B^T / sqrt(r) for a matrix, z for a vector."""
    a, b = opt.factors(seed, index, p)
    if b is None:
        return a[:, 0].view_as(p)
    return (a @ b.T / math.sqrt(opt.perturbation_rank)).view_as(p)


def written(opt: GRZO, model: torch.nn.Module, seed: int, sign: float, score) -> float:
    """``score(model)`` with x + sign * eps * z(seed) written into the weights (put back after)."""
    base = weights(model)
    with torch.no_grad():
        for index, p in enumerate(model.parameters()):
            p.add_(direction(opt, seed, index, p).to(p.dtype), alpha=sign * opt.eps)
        value = float(score(model))
        for p, w in zip(model.parameters(), base):
            p.copy_(w)
    return value


def test_each_example_sees_its_own_pair():
    """Members 2k and 2k + 1 (example k's rows) see +eps z_k and -eps z_k: the losses of the weights written."""
    model = lm(torch.float64, tie=False)
    opt = GRZO(model.parameters(), eps=1e-2, batch_size=3, perturbation_rank=2, seed=4, chunk_size=CHUNK)
    seeds = [11, 12, 13]
    batched = opt.score(lambda: pair_losses(model), seeds)
    alone = [written(opt, model, s, sign, lambda m, k=k: pair_losses(m, IDS[k:k + 1])[0])
             for k, s in enumerate(seeds) for sign in (1.0, -1.0)]
    assert batched == pytest.approx(alone, abs=1e-6)  # (the population's factors are fp32)
    assert batched[0] != pytest.approx(batched[1], abs=1e-4)  # the pair differs: the perturbation reached the rows


def test_step_is_the_published_rule():
    """x <- x - lr / (2 eps B) * sum_k (delta_k / s) z_k, delta_k = l_k(+) - l_k(-), s their 1/B standard
    deviation; the record holds per seed delta_k / (2 eps s)."""
    model = lm(torch.float64, tie=False)
    before = weights(model)
    opt = GRZO(model.parameters(), lr=1e-4, eps=1e-2, batch_size=3, seed=2, chunk_size=CHUNK)
    returned = opt.step(lambda: pair_losses(model))
    record = opt.trajectory[-1]
    fresh = lm(torch.float64, tie=False)
    losses = [written(opt, fresh, s, sign, lambda m, k=k: pair_losses(m, IDS[k:k + 1])[0])
              for k, s in enumerate(record["seeds"]) for sign in (1.0, -1.0)]
    deltas = [p - m for p, m in zip(losses[0::2], losses[1::2])]
    spread = statistics.pstdev(deltas)  # (the population's factors are fp32: losses agree to ~1e-8)
    assert returned == pytest.approx(sum(losses) / 6, abs=1e-6)
    assert record["spread"] == pytest.approx(spread, rel=1e-3)
    assert record["grads"] == pytest.approx([d / spread / 2e-2 for d in deltas], rel=1e-3)
    for (index, p, _), w in zip(opt.trainable(), before):
        expected = w - 1e-4 / 3 * sum(g * direction(opt, s, index, p) for s, g in zip(record["seeds"],
                                                                                       record["grads"]))
        assert torch.allclose(p.detach(), expected, atol=1e-7, rtol=0)  # a move of ~1e-2, made in fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lr_zero_and_exceptions_leave_weights_bitwise(dtype):
    model = lm(dtype)
    base = weights(model)
    opt = GRZO(model.parameters(), lr=0.0, eps=1e-2, batch_size=3, chunk_size=CHUNK)
    opt.step(lambda: pair_losses(model))
    assert same(weights(model), base) and len(opt.trajectory) == 1
    opt = GRZO(model.parameters(), lr=1e-3, eps=1e-2, batch_size=3, chunk_size=CHUNK)

    def fails():
        pair_losses(model)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(fails)
    assert same(weights(model), base) and not opt.trajectory
    assert isinstance(model.model.norm.weight, torch.nn.Parameter)  # swapped weights put back
    opt.step(lambda: pair_losses(model))
    assert not same(weights(model), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_and_resume_are_bitwise(dtype):
    model = lm(dtype)
    base = weights(model)
    settings = dict(lr=1e-3, eps=1e-2, batch_size=3, perturbation_rank=2, seed=5, weight_decay=0.1,
                    chunk_size=CHUNK)
    opt = GRZO(model.parameters(), **settings)
    for _ in range(3):
        opt.step(lambda: pair_losses(model))
    tuned, state = weights(model), opt.state_dict()
    assert state["mezo"]["estimator"] == "grzo" and not same(tuned, base)
    other = lm(dtype)
    replayed = replay(list(other.parameters()), state)
    assert isinstance(replayed, GRZO) and same(weights(other), tuned) and replayed.num_perturbations_done == 9
    resumed = lm(dtype)
    first = GRZO(resumed.parameters(), **settings)
    for _ in range(2):
        first.step(lambda: pair_losses(resumed))
    again = lm(dtype)
    cont = replay(list(again.parameters()), first.state_dict())
    cont.step(lambda: pair_losses(again))
    assert same(weights(again), tuned)


def test_estimate_agrees_with_the_gradient():
    """Many examples whose gradients agree (one sequence, 300 times), each with its own direction: the move's
    cosine with -grad is clearly positive (expected about sqrt(B / d) = 0.11 for d ~ 22k); scoring the negated
    losses moves against it (the test can fail). Examples with unrelated gradients (random sequences) gain
    nothing from B directions: BENCHMARKS.md "Per-example directions" measures where SST-2 lies."""
    model = lm(torch.float64, tie=True)
    ids = IDS[:1].repeat(300, 1)
    loss = pair_losses(model, ids).mean()
    grad = torch.cat([g.view(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    before = weights(model)
    cosines = []
    for sign in (1.0, -1.0):
        opt = GRZO(model.parameters(), lr=1e-4, eps=1e-4, batch_size=300, perturbation_rank=4, seed=3)
        opt.step(lambda s=sign: s * pair_losses(model, ids))
        move = torch.cat([(p.detach() - w).view(-1) for p, w in zip(model.parameters(), before)])
        cosines.append(float(F.cosine_similarity(move, -grad, dim=0)))
        with torch.no_grad():
            for p, w in zip(model.parameters(), before):
                p.copy_(w)
    assert cosines[0] > 0.05 and cosines[1] < -0.05, cosines


def test_no_spread_no_move_settings_and_nonfinite_losses():
    model = lm()
    base = weights(model)
    opt = GRZO(model.parameters(), lr=1.0, batch_size=2)
    opt.step(lambda: [1.0, 1.0, 2.0, 2.0])  # every difference 0: no signal
    assert same(weights(model), base) and opt.trajectory[-1]["grads"] == [0.0, 0.0]
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        opt.step(lambda: [1.0, float("nan"), 2.0, 3.0])
    assert same(weights(model), base) and len(opt.trajectory) == 1
    with pytest.raises(ValueError, match="4 members"):
        opt.step(lambda: [1.0, 2.0])
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
            GRZO(model.parameters(), batch_size=bad)
    assert GRZO(model.parameters(), eps=3e-3).param_groups[0]["lr"] == pytest.approx(GRZO.step_length * 3e-3)


def uncached(objective):
    """A copy without the candidates generated on the last batch: each member of a pair generates its own."""
    fresh = copy.copy(objective)
    if hasattr(fresh, "_candidates"):
        fresh._candidates = None
    return fresh


def test_per_example_objective_scores_metric_cross_entropy_and_reward(tokenizer, small_lm):
    """Every kind of objective (generation and rewards: one batched generate): member 2k and 2k + 1 score example
    k alone, perturbed by its own pair; unperturbed, each member's value is its example's."""
    for p in small_lm.parameters():
        p.requires_grad_(True)
    # and SQuAD's F1 objective: each member's greedy answer among the options, examples with different numbers of
    # gold answers (the batched pass pads them), under both supports of the options' weights; under "options" an
    # example whose gold answer is the greedy one has a single option and scores no pass (the others still do)
    generator = GenerationPredictor(tokenizer, max_new_tokens=4)
    greedy = generator.generate(small_lm, ["Q: capital of France? A:"])[0]
    squad = [{"prompt": "Q: capital of France? A:", "answers": [greedy]},
             {"prompt": "Q: two plus two, written out? A:", "answers": ["four", "4", "Four!"]}]
    cases = [*objective_cases(tokenizer), *((MetricObjective(get_metric("squad_f1"), generator, support=support),
                                             squad) for support in ("model", "options"))]
    opt = GRZO(small_lm.parameters(), eps=0.05, batch_size=2, perturbation_rank=2)
    seeds = [7, 8]
    for objective, data in cases:
        per = PerExampleObjective(objective)
        with torch.no_grad():
            plain = per(small_lm, data)
            assert plain == pytest.approx([objective(small_lm, [ex]) for ex in data for _ in (0, 1)], abs=1e-4)
        batched = opt.score(lambda p=per, d=data: p(small_lm, d), seeds)
        alone = [written(opt, small_lm, s, sign, lambda m, o=objective, ex=ex: uncached(o)(m, [ex]))
                 for ex, s in zip(data, seeds) for sign in (1.0, -1.0)]
        assert batched == pytest.approx(alone, abs=1e-4), type(objective).__name__
        assert set(objective.last_values) >= {"reward"} if isinstance(objective, RewardObjective) else True


class FixedCandidates(Objective):
    """Minus the first candidate's log-probability among each example's fixed candidates (one candidate: no pass,
    a loss of 0): examples that skip a pass and examples with different numbers of candidates in one batch."""

    def __init__(self, predictor, candidates: dict[str, list[str]]):
        self.predictor, self.candidates, self.name = predictor, candidates, "fixed"

    def __call__(self, model, batch):
        prompts = [ex["prompt"] for ex in batch]
        scores = candidate_logits(self.predictor, model, prompts, [self.candidates[p] for p in prompts])
        return -float(scores.log_softmax(-1)[:, 0].mean())


def test_members_that_skip_a_pass_or_hold_fewer_candidates(tokenizer, small_lm):
    """Under the perturbation hooks: example 0 has one candidate and skips the candidates pass, example 1 has
    three, example 2 two; alone, and first in a sum whose second term's pass every example makes (a member then
    waits for another pass than the others): each member's loss is that of its perturbation written."""
    for p in small_lm.parameters():
        p.requires_grad_(True)
    generator = GenerationPredictor(tokenizer, max_new_tokens=4)
    data = [{"prompt": "Q: one? A:", "target": " one"}, {"prompt": "Q: two? A:", "target": " two"},
            {"prompt": "Q: three, said twice? A:", "target": " three"}]
    fixed = FixedCandidates(generator, {"Q: one? A:": [" x"], "Q: two? A:": [" a", " b b", " c"],
                                        "Q: three, said twice? A:": [" d", " e"]})
    opt = GRZO(small_lm.parameters(), eps=0.05, batch_size=3, perturbation_rank=2)
    seeds = [5, 6, 7]
    for objective in (fixed, WeightedSum([(1.0, fixed), (0.5, CrossEntropy(generator))])):
        batched = opt.score(lambda o=objective: PerExampleObjective(o)(small_lm, data), seeds)
        alone = [written(opt, small_lm, s, sign, lambda m, ex=ex, o=objective: o(m, [ex]))
                 for ex, s in zip(data, seeds) for sign in (1.0, -1.0)]
        assert batched == pytest.approx(alone, abs=1e-4), objective.name
        assert batched[2] != pytest.approx(batched[3], abs=1e-5)  # the pair differs: perturbed rows reached
    assert set(objective.last_values) == {"cross_entropy"}  # a sum logs its terms' values (the fixed one has none)


def test_trains_from_the_library_and_resumes_bitwise(tokenizer, tmp_path):
    """train() wraps the objective per example (one batched pass), refuses another batch size, lowers the
    training loss of a tiny model, and a run stopped after 2 steps and resumed ends on the straight run's weights."""
    from zo_objectives.checkpoint import resume
    from zo_objectives.train import train

    labels = LabelWordPredictor(tokenizer, [" bad", " good"])
    data = [{"prompt": f"Review {i}: {'great' if i % 2 else 'awful'}. It was", "label": i % 2} for i in range(8)]

    def run(steps: int, run_dir, model=None, opt=None, batch_size: int = 4):
        model = model or build_small_lm(len(tokenizer))
        for p in model.parameters():
            p.requires_grad_(True)
        opt = opt or GRZO(model.parameters(), lr=1e-3, eps=1e-2, batch_size=4, seed=1)
        history = train(model, opt, CrossEntropy(labels), data, steps=steps, batch_size=batch_size, seed=0,
                        progress=False, run_dir=run_dir)
        return model, opt, history

    with pytest.raises(ValueError, match="batch_size=4"):
        run(1, None, batch_size=2)
    straight, opt, history = run(6, tmp_path / "straight")
    assert len(history) == 6 and all(len(r["seeds"]) == 4 for r in opt.trajectory)
    assert min(r["loss"] for r in history[2:]) < history[0]["loss"]
    run(2, tmp_path / "resumed")
    model = build_small_lm(len(tokenizer))
    for p in model.parameters():
        p.requires_grad_(True)
    cont, step = resume(tmp_path / "resumed", list(model.parameters()))
    assert isinstance(cont, GRZO) and step == 2
    run(6, tmp_path / "resumed", model, cont)
    assert same(weights(model), weights(straight))


CLI = ["--model", "tiny-random", "--task", "sst2", "--train-size", "32", "--batch-size", "4", "--no-progress",
       "--eval-size", "8", "--eval-every", "0", "--no-eval-before", "--estimator", "grzo"]


def test_cli_grzo_killed_then_resumed_is_bitwise_with_a_row_per_step(tmp_path):
    """zo-tune --estimator grzo: SIGKILL mid-run, --resume to a later step: the weights of a straight run, one
    metrics row per step; config.json names the estimator, its batch and its default lr."""
    config, _ = killed_then_resumed(CLI, tmp_path)
    assert (config["estimator"], config["batch_size"], config["perturbation_rank"]) == ("grzo", 4, 1)
    assert config["lr"] == GRZO.step_length * config["eps"]
