"""RewardObjective: TRL-style reward functions, weights, columns, and clear errors with weights restored."""

from __future__ import annotations

import doctest
import re
import signal
import time

import numpy as np
import pytest
import torch

from zo_objectives.estimators import MeZO
from zo_objectives.objectives import RewardError, RewardObjective


class EchoGenerator:
    """Completes each prompt with itself reversed, scaled by the model's one weight (no language model)."""

    def __init__(self):
        self.calls = 0

    def generate(self, model, prompts, strip=True):
        self.calls += 1
        return [p[::-1] + ("!" * int(model().item() > 0)) for p in prompts]


class OneWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([0.3]))

    def forward(self) -> torch.Tensor:  # MeZO perturbs weights as a module's forward sees them
        return self.weight


BATCH = [{"prompt": "ab", "want": "ba"}, {"prompt": "xyz", "want": "q"}]


def length(prompts, completions, **columns):
    return [len(c) for c in completions]


def matches(prompts, completions, want, **columns):
    return [float(c.rstrip("!") == w) for c, w in zip(completions, want)]


def test_weighted_rewards_and_columns():
    objective = RewardObjective(EchoGenerator(), [length, matches], weights=[0.5, 2.0])
    assert objective.last_means == {}
    # completions: "ba!", "zyx!" -> lengths 3, 4; matches 1, 0
    expected = ((0.5 * 3 + 2.0 * 1) + (0.5 * 4 + 2.0 * 0)) / 2
    assert objective(OneWeight(), BATCH) == pytest.approx(-expected)
    assert objective.last_means == {"length": 3.5, "matches": 0.5}  # each reward's own mean, unweighted
    objective(OneWeight(), BATCH[:1])
    assert objective.last_means == {"length": 3.0, "matches": 1.0}  # the last batch only


def test_unweighted_is_plain_sum():
    objective = RewardObjective(EchoGenerator(), [length])
    assert objective(OneWeight(), BATCH) == pytest.approx(-3.5)


def test_a_single_reward_function_and_numpy_rewards():
    def np_length(prompts, completions, **columns):
        return np.array([len(c) for c in completions], dtype=np.float32)

    def np_scalars(prompts, completions, **columns):
        return [np.float64(0.25), np.int64(2)]

    single = RewardObjective(EchoGenerator(), np_length)  # not in a list
    assert single.rewards == [np_length]
    assert single(OneWeight(), BATCH) == pytest.approx(-3.5)
    both = RewardObjective(EchoGenerator(), [np_length, np_scalars, np_length], weights=[1.0, 2.0, 0.0])
    assert both(OneWeight(), BATCH) == pytest.approx(-(3.5 + 2 * 1.125))
    assert both.last_means == {"np_length_0": 3.5, "np_scalars": 1.125, "np_length_2": 3.5}  # repeats numbered
    assert all(type(v) is float for v in both.last_means.values())


def test_a_reward_function_in_the_generator_place_is_refused_when_built():
    with pytest.raises(ValueError, match="generator must have .generate.*got 'length': pass reward functions as "
                                         "rewards="):
        RewardObjective(length, [matches])
    with pytest.raises(ValueError, match="reward 'length' is not callable"):
        RewardObjective(EchoGenerator(), [length.__name__])


@pytest.mark.parametrize("bad,message", [
    (lambda prompts, completions, **kw: 1 / 0, "raised ZeroDivisionError"),
    (lambda prompts, completions, **kw: [1.0], "returned 1 values for 2"),
    (lambda prompts, completions, **kw: ["good", 1.0], "'good'"),
    (lambda prompts, completions, **kw: [True, 1.0], "True"),
    (lambda prompts, completions, **kw: [float("nan"), 1.0], "nan .*not NaN"),
    (lambda prompts, completions, **kw: [None, 1.0], "None"),
])
def test_bad_rewards_raise_clearly_and_restore_weights(bad, message):
    model = OneWeight()
    before = model.weight.detach().clone()
    optimizer = MeZO(model.parameters(), lr=0.1, eps=0.01)
    objective = RewardObjective(EchoGenerator(), [length, bad])
    with pytest.raises(RewardError, match=message):
        optimizer.step(lambda: objective(model, BATCH))
    assert torch.equal(model.weight.detach(), before)  # bitwise: the stored weight is never perturbed
    assert optimizer.trajectory == []


def test_a_slow_reward_stops_at_its_time_limit_and_restores_weights():
    """A reward past ``timeout`` raises RewardError (SIGALRM interrupts it; a reward's own ``except Exception``
    cannot swallow that), the weights stay bitwise; a quick reward under the same limit passes."""
    def stalls(prompts, completions, **columns):
        try:
            time.sleep(30)
        except Exception:  # a reward that swallows its errors
            pass
        return [0.0] * len(completions)

    model = OneWeight()
    before = model.weight.detach().clone()
    optimizer = MeZO(model.parameters(), lr=0.1, eps=0.01)
    objective = RewardObjective(EchoGenerator(), [length, stalls], timeout=0.2)
    began = time.monotonic()
    with pytest.raises(RewardError, match=r"reward 'stalls' took more than 0.2 s on 2 completions \(--reward-timeout"):
        optimizer.step(lambda: objective(model, BATCH))
    assert time.monotonic() - began < 10  # interrupted, not waited out
    assert torch.equal(model.weight.detach(), before) and optimizer.trajectory == []
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # the handler is put back
    assert RewardObjective(EchoGenerator(), [length], timeout=5)(OneWeight(), BATCH) == pytest.approx(-3.5)
    with pytest.raises(ValueError, match="timeout must be > 0 and <= 86400 seconds"):
        RewardObjective(EchoGenerator(), [length], timeout=0)
    with pytest.raises(ValueError, match="timeout must be > 0 and <= 86400 seconds"):  # setitimer overflowed
        RewardObjective(EchoGenerator(), [length], timeout=1e300)


def test_invalid_configuration():
    with pytest.raises(ValueError, match="at least one reward function"):
        RewardObjective(EchoGenerator(), [])
    with pytest.raises(ValueError, match="2 weights for 1"):
        RewardObjective(EchoGenerator(), [length], weights=[1.0, 2.0])


def test_reward_trains_a_toy_policy():
    """A reward that prefers the "!" suffix (weight > 0) moves the weight up from below zero."""
    model = OneWeight()
    with torch.no_grad():
        model.weight.fill_(-0.004)
    optimizer = MeZO(model.parameters(), lr=1e-3, eps=0.01, seed=1)
    def bangs(prompts, completions, **columns):
        return [c.count("!") for c in completions]

    objective = RewardObjective(EchoGenerator(), [bangs])
    for _ in range(50):
        optimizer.step(lambda: objective(model, BATCH))
    assert model.weight.item() > 0


def test_reward_example_rewards():
    from examples import reward_tuning as ex
    from metrics.rewards import token_f1

    results = doctest.testmod(ex)  # the example in its reward function's docstring
    assert results.attempted >= 1 and results.failed == 0
    texts = ["Paris", "", "one two three four five six seven", "a b c d e f"]
    assert ex.short_answer([], texts) == [1.0, 0.0, 0.0, 1.0]
    assert ex.answer_f1 is token_f1
    assert ex.answer_f1([], ["the Eiffel Tower", "nothing"], answers=[["Eiffel Tower"], ["Paris"]]) == [1.0, 0.0]


@pytest.mark.parametrize("form", ["population", "es", "expected"])
def test_reward_example_smoke_run(capsys, form):
    from examples import reward_tuning as ex
    from metrics.rewards import answer_check
    from zo_objectives.objectives import reward_columns

    results = ex.main(["--model", "tiny-random", "--steps", "1", "--held-out", "2", "--batch-size", "2",
                       "--max-new-tokens", "2", "--form", form, "--candidates", "2", "--population", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["answer_check:", "weighted:"]
    # the "before" figure is the untuned model's reward of its greedy completions, computed here again
    model, tokenizer = ex.load_model("tiny-random")
    held_out = ex.get_task("arith").examples("dev", n=2)
    completions = ex.GenerationPredictor(tokenizer, max_new_tokens=2).generate(model, [e["prompt"] for e in held_out])
    values = answer_check([], completions, **{k: v for k, v in reward_columns(held_out).items() if k == "answer"})
    before, after = results["answer_check"]
    assert before == pytest.approx(sum(values) / 2) and results["weighted"] == (before, after)
    assert 0.0 <= after <= 1.0
    assert re.fullmatch(r"held-out answer_check: \S+ -> \S+ after 1 steps", lines[0])


class SamplingGenerator:
    """Samples from a fixed list of texts in turn; a candidate's log-likelihood is ``model.weight`` for
    "good" and 0 otherwise (a stand-in for Generation with temperature > 0)."""

    temperature = 1.0
    texts = ["good", "bad", "good", "", "meh", "bad"]

    def __init__(self):
        self.calls = 0

    def generate(self, model, prompts, strip=True):
        self.calls += 1
        return [self.texts[i % len(self.texts)] for i in range(len(prompts))]

    def candidate_scores(self, model, prompts, candidates, length_normalize=False):
        out = torch.full((len(prompts), max(len(c) for c in candidates)), float("-inf"))
        for row, cands in enumerate(candidates):
            for col, c in enumerate(cands):
                out[row, col] = model().item() if c == "good" else 0.0
        return out


def test_candidates_expected_reward_over_distinct_samples_rewarded_once():
    calls = []

    def is_good(prompts, completions, **columns):
        calls.append(len(completions))
        return [float(c == "good") for c in completions]

    generator, model = SamplingGenerator(), OneWeight()
    objective = RewardObjective(generator, [is_good], candidates=3)
    # prompt "ab": good, bad, good -> {good, bad}; prompt "xyz": "", meh, bad -> {meh, bad} (empty left out)
    p_good = torch.tensor([0.3, 0.0]).softmax(0)[0].item()
    assert objective(model, BATCH) == pytest.approx(-(p_good + 0.0) / 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert objective(model, BATCH) == pytest.approx(-torch.tensor([1.0, 0.0]).softmax(0)[0].item() / 2)
    assert generator.calls == 1 and calls == [6]  # generated and rewarded once for the batch
    assert objective.last_means == {"is_good": pytest.approx(2 / 6)}  # over the 6 sampled candidates


def test_candidates_train_toward_the_rewarded_text_and_need_sampling():
    def is_good(prompts, completions, **columns):
        return [float(c == "good") for c in completions]

    model = OneWeight()
    optimizer = MeZO(model.parameters(), lr=1.0, eps=0.01, seed=0)
    objective = RewardObjective(SamplingGenerator(), [is_good], candidates=3)
    for _ in range(20):
        optimizer.step(lambda: objective(model, BATCH))
    assert model.weight.item() > 1.0  # the rewarded candidate's likelihood went up
    with pytest.raises(ValueError, match="sampling generator"):
        RewardObjective(EchoGenerator(), [is_good], candidates=2)
    with pytest.raises(ValueError, match=">= 0"):
        RewardObjective(SamplingGenerator(), [is_good], candidates=-1)


class StepSampler(SamplingGenerator):
    """Samples a new text each call from the torch RNG, which ``GenerationPredictor`` seeds per step."""

    def generate(self, model, prompts, strip=True):
        from zo_objectives.scoring import sampling_seed

        self.calls += 1
        gen = torch.Generator().manual_seed(sampling_seed(prompts))
        return [self.texts[int(i)] for i in torch.randint(0, len(self.texts), (len(prompts),), generator=gen)]


def test_candidates_are_drawn_and_rewarded_again_at_every_step_of_a_repeated_batch():
    seen = []

    def is_good(prompts, completions, **columns):
        seen.append(list(completions))
        return [float(c == "good") for c in completions]

    generator, model = StepSampler(), OneWeight()
    optimizer = MeZO(model.parameters(), lr=0.0, eps=0.01, n_perturbations=2, seed=3)
    objective = RewardObjective(generator, [is_good], candidates=3)
    for _ in range(5):  # the same batch every step: an epoch of one batch
        optimizer.step(lambda: objective(model, BATCH))
        # the candidates scored this step are those sampled (and rewarded) this step
        assert [c for row in objective._cache[1] for c in row] == [
            c for c in dict.fromkeys(seen[-1][:3]) if c] + [c for c in dict.fromkeys(seen[-1][3:]) if c]
    assert generator.calls == len(seen) == 5  # once per step, shared by its 4 perturbed evaluations
    assert len({tuple(s) for s in seen}) > 1  # the steps drew different samples
    again = MeZO(OneWeight().parameters(), lr=0.0, eps=0.01, n_perturbations=2, seed=3)
    replayed = RewardObjective(StepSampler(), [is_good], candidates=3)
    first = []
    for _ in range(5):
        again.step(lambda: replayed(model, BATCH))
        first.append([c for row in replayed._cache[1] for c in row])
    assert first[-1] == [c for row in objective._cache[1] for c in row]  # a pure function of (seed, step, prompts)


def test_sampling_is_seeded_by_seed_step_and_prompts_on_a_real_model():
    from zo_objectives import GenerationPredictor, load_model

    model, tokenizer = load_model("tiny-random")
    generator = GenerationPredictor(tokenizer, max_new_tokens=6, temperature=1.0)
    prompts = ["Question: 1 + 2 =", "Question: 3 + 4 ="]
    outside = generator.generate(model, prompts)
    assert generator.generate(model, prompts) == outside  # outside a step: fixed by the prompts
    draws = {}

    def closure(optimizer):
        draws.setdefault(len(optimizer.trajectory), []).append(tuple(generator.generate(model, prompts)))
        return 0.0

    for seed in (0, 1):
        optimizer = MeZO(model.parameters(), lr=0.0, eps=1e-3, seed=seed)
        for _ in range(3):
            optimizer.step(lambda o=optimizer: closure(o))
        for step in range(3):
            plus, minus = draws.pop(step)
            draws[seed, step] = plus
    assert len(set(draws.values())) == 6  # every (seed, step) draws its own samples


def test_a_limit_that_expires_at_once_is_a_reward_error():
    """The alarm was set before the ``try`` that turns it into a RewardError: at 1e-6 s it fired first and the
    internal exception escaped (issue 35). Whenever it fires, the caller sees the time-limit error."""
    for _ in range(50):
        with pytest.raises(RewardError, match="took more than 1e-06 s"):
            RewardObjective(EchoGenerator(), [length], timeout=1e-6)(OneWeight(), BATCH)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL
