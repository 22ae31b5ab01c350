"""FZOO (zo_objectives.estimators.fzoo): each member's loss from the one batched pass equals the loss of the model
with its perturbation written into the weights; the step is the published rule, exact (lr 0, exceptions, replay, resume)
and points along the gradient; it trains from the library, objectives and rewards included."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import build_small_lm, killed_then_resumed, objective_cases

from zo_objectives.checkpoint import replay
from zo_objectives.estimators.fzoo import FZOO
from zo_objectives.objectives import CrossEntropy, PopulationObjective
from zo_objectives.scoring import LabelWordPredictor

VOCAB = 100
IDS = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
CHUNK = 1000  # not a multiple of the rows (32 wide): chunks begin and end inside rows


def lm(dtype: torch.dtype = torch.float32, tie: bool = True, layers: int = 2) -> torch.nn.Module:
    model = build_small_lm(VOCAB, tie=tie, layers=layers).to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def member_losses(model: torch.nn.Module, members: int, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Next-token cross-entropy of each member's copy of ``ids`` (rows grouped by member)."""
    x = ids.repeat(members, 1)
    logits = model(input_ids=x).logits
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="none")
    return losses.view(members, -1).mean(1)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def direction(opt: FZOO, seed: int, index: int, p: torch.Tensor) -> torch.Tensor:
    """u of one tensor, shaped like it: the noise's chunks joined (full rank), or A B^T / sqrt(r) (low rank)."""
    if opt.perturbation_rank and p.ndim >= 2:
        a, b = opt.factors(seed, index, p)
        return (a @ b.T / math.sqrt(opt.perturbation_rank)).view_as(p)
    if opt.perturbation_rank:
        return opt.factors(seed, index, p)[0][:, 0].view_as(p)
    return torch.cat([z.clone() for _, z in opt.noise.chunks(seed, index, p.detach().view(-1))]).view_as(p)


def perturbed_losses(opt: FZOO, model: torch.nn.Module, seeds: list[int], score) -> list[float]:
    """``score(model)`` at ``model``'s weights, then with x + eps * u_i written into them (put back after each);
    ``model``'s parameters in the order ``opt`` was built with."""
    base, out = weights(model), []
    for seed in [None, *seeds]:
        with torch.no_grad():
            if seed is not None:
                for index, p in enumerate(model.parameters()):
                    p.add_(direction(opt, seed, index, p).to(p.dtype), alpha=opt.eps)
            out.append(float(score(model)))
            for p, w in zip(model.parameters(), base):
                p.copy_(w)
    return out


@pytest.mark.parametrize("noise,rank,tie", [("rademacher", 0, True), ("signs", 0, False), ("table", 0, True),
                                            ("gaussian", 0, False), ("rademacher", 2, True), ("table", 3, False)])
def test_member_losses_equal_explicitly_perturbed_weights(noise, rank, tie):
    model = lm(tie=tie)
    opt = FZOO(model.parameters(), lr=0.0, eps=1e-2, n_perturbations=3, perturbation_rank=rank, noise=noise,
               chunk_size=CHUNK, seed=1)
    seeds = [11, 22, 33]
    batched = opt.score(lambda: member_losses(model, 4), seeds)
    alone = perturbed_losses(opt, model, seeds, lambda m: member_losses(m, 1)[0])
    assert batched == pytest.approx(alone, abs=2e-5)
    assert len(set(batched)) == 4  # every member saw its own perturbation, member 0 none
    if noise in ("rademacher", "signs") and not rank:  # u is +-1, as published
        assert set(direction(opt, 11, 0, model.model.embed_tokens.weight).unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("noise", ["signs", "gaussian"])
def test_member_losses_through_layer_copies_equal_explicitly_perturbed_weights(noise):
    """Many rows per member (80 here): each member's rows go through its own perturbed copy of a linear layer."""
    long = torch.randint(0, VOCAB, (4, 20), generator=torch.Generator().manual_seed(1))
    model = lm(tie=False)
    opt = FZOO(model.parameters(), lr=0.0, eps=1e-2, n_perturbations=3, noise=noise, chunk_size=CHUNK, seed=1)
    seeds = [11, 22, 33]
    batched = opt.score(lambda: member_losses(model, 4, long), seeds)
    alone = perturbed_losses(opt, model, seeds, lambda m: member_losses(m, 1, long)[0])
    assert batched == pytest.approx(alone, abs=2e-5) and len(set(batched)) == 4


def largest_allocation(fn) -> int:
    """The largest block of CPU memory one operation allocated while ``fn`` ran (bytes, torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_no_member_holds_a_copy_of_a_layer():
    """Full-rank members make their noise a chunk at a time for the layer being computed. With few rows per member
    (a decoding step) no allocation comes near the size of the largest layer (1 MiB); with many, each member's rows
    go through its own perturbed copy of the layer (one matmul instead of two), one copy at a time: never the N
    copies of a layer at once. MeZO's forward with a perturbed copy per layer makes one."""
    from zo_objectives.estimators import MeZO

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 256), torch.nn.Linear(256, 1024), torch.nn.Tanh(),
                                torch.nn.Linear(1024, 8))
    layer = model[1].weight.numel() * 4
    ids = torch.randint(0, 1000, (2, 3))
    for rank in (0, 2):
        opt = FZOO(model.parameters(), n_perturbations=4, perturbation_rank=rank, chunk_size=1 << 14)
        closure = lambda: model(ids.repeat(5, 1)).mean((1, 2)).view(5, -1).mean(1)  # noqa: E731
        opt.score(closure, [1, 2, 3, 4])  # the noise table is built once, at the first use
        assert largest_allocation(lambda o=opt, c=closure: o.score(c, [1, 2, 3, 4])) < layer // 4, rank
    long = torch.randint(0, 1000, (2, 60))  # 120 rows per member: each member's own copy of the first linear
    opt = FZOO(model.parameters(), n_perturbations=4, chunk_size=1 << 14)
    closure = lambda: model(long.repeat(5, 1)).mean((1, 2)).view(5, -1).mean(1)  # noqa: E731
    opt.score(closure, [1, 2, 3, 4])
    with torch.no_grad():
        plain = largest_allocation(lambda: model(long.repeat(5, 1)))
    assert largest_allocation(lambda: opt.score(closure, [1, 2, 3, 4])) < plain + 2 * layer  # 4 copies: + 4 layers
    mezo = MeZO(model.parameters(), noise="gaussian", chunk_size=1 << 14)
    assert largest_allocation(lambda: mezo.score(lambda: model(ids).mean(), 5, 1.0)) >= layer


def test_step_is_the_published_rule():
    """x <- x - lr / (eps * sigma) * (1/N) * sum_i (l_i - l_0) u_i, sigma the sample std of l_1..l_N; the record
    holds the per-seed coefficients with sigma folded in, and the step returns l_0."""
    model = lm(torch.float64, tie=False)
    before = weights(model)
    opt = FZOO(model.parameters(), lr=1e-4, eps=1e-3, n_perturbations=4, seed=2, chunk_size=CHUNK)
    returned = opt.step(lambda: member_losses(model, 5))
    record = opt.trajectory[-1]
    losses = perturbed_losses(opt, lm(torch.float64, tie=False), record["seeds"], lambda m: member_losses(m, 1)[0])
    sigma = statistics.stdev(losses[1:])
    assert returned == pytest.approx(losses[0], abs=1e-9) and record["sigma"] == pytest.approx(sigma, rel=1e-6)
    assert record["grads"] == pytest.approx([(v - losses[0]) / (1e-3 * sigma) for v in losses[1:]], rel=1e-5)
    for (index, p, _), w in zip(opt.trainable(), before):
        expected = w - 1e-4 / (1e-3 * sigma) / 4 * sum(
            (v - losses[0]) * direction(opt, s, index, p) for s, v in zip(record["seeds"], losses[1:]))
        assert torch.allclose(p.detach(), expected, atol=1e-12, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [0, 2])
def test_lr_zero_and_exceptions_leave_weights_bitwise(dtype, rank):
    model = lm(dtype)
    base = weights(model)
    opt = FZOO(model.parameters(), lr=0.0, eps=1e-2, n_perturbations=3, perturbation_rank=rank, chunk_size=CHUNK)
    opt.step(lambda: member_losses(model, 4))
    assert same(weights(model), base) and len(opt.trajectory) == 1
    opt = FZOO(model.parameters(), lr=1e-3, eps=1e-2, n_perturbations=3, perturbation_rank=rank, chunk_size=CHUNK)

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


@pytest.mark.parametrize("dtype,rank,noise", [(torch.float32, 0, "signs"), (torch.bfloat16, 0, "rademacher"),
                                              (torch.bfloat16, 0, "table"), (torch.bfloat16, 2, "rademacher")])
def test_replay_and_resume_are_bitwise(dtype, rank, noise):
    model = lm(dtype)
    base = weights(model)
    settings = dict(lr=1e-3, eps=1e-2, n_perturbations=3, perturbation_rank=rank, seed=5, weight_decay=0.1,
                    noise=noise, chunk_size=CHUNK)
    opt = FZOO(model.parameters(), **settings)
    for _ in range(3):
        opt.step(lambda: member_losses(model, 4))
    tuned, state = weights(model), opt.state_dict()
    assert state["mezo"]["estimator"] == "fzoo" and len(state["mezo"]["trajectory"]) == 3
    assert not same(tuned, base)

    other = lm(dtype)
    replayed = replay(list(other.parameters()), state)
    assert isinstance(replayed, FZOO) and same(weights(other), tuned)
    assert replayed.num_perturbations_done == opt.num_perturbations_done == 9

    resumed = lm(dtype)  # two steps, then a replay of them, then the third step
    first = FZOO(resumed.parameters(), **settings)
    for _ in range(2):
        first.step(lambda: member_losses(resumed, 4))
    again = lm(dtype)
    cont = replay(list(again.parameters()), first.state_dict())
    cont.step(lambda: member_losses(again, 4))
    assert same(weights(again), tuned)


def test_estimate_agrees_with_the_gradient():
    """The cosine between the step's move and -grad is clearly positive with many members (expected about
    1 / sqrt(1 + d / N) = 0.16 for d ~ 22k; a random direction's |cos| ~ 0.01); scoring the negated losses moves
    against the gradient (the test can fail)."""
    model = lm(torch.float64, tie=True)
    loss = member_losses(model, 1)[0]
    grad = torch.cat([g.view(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    before = weights(model)
    cosines = []
    for sign in (1.0, -1.0):
        opt = FZOO(model.parameters(), lr=1e-4, eps=1e-4, n_perturbations=600, seed=3)
        opt.step(lambda s=sign: s * member_losses(model, 601))
        move = torch.cat([(p.detach() - w).view(-1) for p, w in zip(model.parameters(), before)])
        cosines.append(float(F.cosine_similarity(move, -grad, dim=0)))
        with torch.no_grad():
            for p, w in zip(model.parameters(), before):
                p.copy_(w)
    assert cosines[0] > 0.1 and cosines[1] < -0.1, cosines


def test_no_spread_no_move_and_nonfinite_losses():
    model = lm()
    base = weights(model)
    opt = FZOO(model.parameters(), lr=1.0, n_perturbations=3)
    assert opt.step(lambda: [2.0, 1.0, 1.0, 1.0]) == 2.0  # every perturbed loss the same: sigma 0
    assert same(weights(model), base) and opt.trajectory[-1]["grads"] == [0.0, 0.0, 0.0]
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        opt.step(lambda: [1.0, float("nan"), 2.0, 3.0])
    assert same(weights(model), base) and len(opt.trajectory) == 1
    skipping = FZOO(model.parameters(), lr=1e-3, n_perturbations=3, on_nonfinite="skip")
    with pytest.warns(UserWarning, match="skipping"):
        skipping.step(lambda: [1.0, float("nan"), 2.0, 3.0])
    record = skipping.trajectory[-1]
    assert record["grads"][0] is None and record["sigma"] == pytest.approx(statistics.stdev([2.0, 3.0]))
    assert not same(weights(model), base)


def test_settings_and_closures_are_checked():
    model = lm()
    for bad in ({"n_perturbations": 1}, {"n_perturbations": True}, {"perturbation_rank": -1},
                {"perturbation_rank": 1.5}):
        with pytest.raises(ValueError, match="n_perturbations|perturbation_rank"):
            FZOO(model.parameters(), **bad)
    with pytest.raises(ValueError, match="unknown noise"):
        FZOO(model.parameters(), noise="uniform")
    opt = FZOO(model.parameters(), n_perturbations=3)
    assert opt.members == 4
    with pytest.raises(ValueError, match="returned 3 losses for 4 members"):
        opt.step(lambda: [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="cannot hold 4 members"):
        opt.step(lambda: member_losses(model, 3).tolist() + [0.0])
    layer_norm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="LayerNorm.weight .* freeze it"):
        FZOO(layer_norm.parameters(), n_perturbations=3).step(lambda: layer_norm(torch.ones(4, 4)).sum(-1))


def test_population_objective_scores_metric_cross_entropy_and_reward(tokenizer, small_lm):
    """Every kind of objective, generation and rewards included (the members decode in one batched generate):
    the batched members' values equal those of the explicitly perturbed model."""
    for p in small_lm.parameters():
        p.requires_grad_(True)
    cases = objective_cases(tokenizer)
    opt = FZOO(small_lm.parameters(), eps=0.05, n_perturbations=2)
    seeds = [7, 8]
    for objective, data in cases:
        members = PopulationObjective(objective, 3)
        batched = opt.score(lambda m=members, d=data: m(small_lm, d), seeds)
        alone = perturbed_losses(opt, small_lm, seeds, lambda m, o=objective, d=data: o(m, d))
        assert batched == pytest.approx(alone, abs=1e-4), type(objective).__name__


def test_trains_from_the_library_and_resumes_bitwise(tokenizer, tmp_path):
    """train() wraps the objective for the members (one batched pass), lowers the training loss of a tiny model,
    and a run stopped after 2 steps and resumed from its folder ends on the weights of the straight run."""
    from zo_objectives.checkpoint import resume
    from zo_objectives.train import train

    labels = LabelWordPredictor(tokenizer, [" bad", " good"])
    data = [{"prompt": f"Review {i}: {'great' if i % 2 else 'awful'}. It was", "label": i % 2} for i in range(8)]

    def run(steps: int, run_dir, model=None, opt=None):
        model = model or build_small_lm(len(tokenizer))
        for p in model.parameters():
            p.requires_grad_(True)
        opt = opt or FZOO(model.parameters(), lr=1e-3, eps=1e-2, n_perturbations=4, seed=1)
        history = train(model, opt, CrossEntropy(labels), data, steps=steps, batch_size=4, seed=0, progress=False,
                        run_dir=run_dir)
        return model, opt, history

    straight, opt, history = run(4, tmp_path / "straight")
    assert len(history) == 4 and len(opt.trajectory) == 4 and all(len(r["seeds"]) == 4 for r in opt.trajectory)
    first = history[0]["loss"]
    assert min(r["loss"] for r in history[1:]) < first  # l_0, the loss before each step, goes down

    run(2, tmp_path / "resumed")
    model = build_small_lm(len(tokenizer))
    for p in model.parameters():
        p.requires_grad_(True)
    cont, step = resume(tmp_path / "resumed", list(model.parameters()))
    assert isinstance(cont, FZOO) and step == 2
    run(4, tmp_path / "resumed", model, cont)
    assert same(weights(model), weights(straight))


CLI = ["--model", "tiny-random", "--task", "sst2", "--train-size", "32", "--batch-size", "4", "--no-progress",
       "--eval-size", "8", "--eval-every", "0", "--no-eval-before", "--estimator", "fzoo", "--n-perturbations", "4"]


def test_cli_fzoo_killed_then_resumed_is_bitwise_with_a_row_per_step(tmp_path):
    """zo-tune --estimator fzoo: SIGKILL mid-run, --resume to a later step: the weights of a straight run, one
    metrics row per step; config.json names the estimator and its resolved defaults."""
    config, _ = killed_then_resumed(CLI, tmp_path)
    assert (config["estimator"], config["n_perturbations"], config["perturbation_rank"], config["noise"]) == (
        "fzoo", 4, 0, "signs")
    assert config["lr"] == FZOO.step_length * config["eps"]  # the measured step length, whatever the eps


def test_default_lr_keeps_the_step_length_for_any_eps(tmp_path):
    """FZOO's step is lr / eps times a normalized estimate: its default lr follows eps (bf16's 3e-3, a greedy
    reward's 1e-2), in the class, in the library's default_lr and in zo-tune alike."""
    from zo_objectives.cli import tune_main
    from zo_objectives.config import GREEDY_REWARD_EPS, default_lr

    weight = torch.nn.Parameter(torch.zeros(3))
    assert FZOO([weight]).defaults["lr"] == pytest.approx(2e-6)
    assert FZOO([weight], eps=3e-3).defaults["lr"] == pytest.approx(6e-6)
    assert FZOO([weight], lr=1e-4, eps=3e-3).defaults["lr"] == 1e-4  # an lr given is kept
    assert default_lr(None, estimator="fzoo", eps=3e-3) == pytest.approx(6e-6)
    assert tune_main([*CLI, "--steps", "1", "--dtype", "bf16", "--output-dir", str(tmp_path / "bf16")]) == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert (config["eps"], config["lr"]) == (3e-3, pytest.approx(6e-6))
    assert tune_main(["--model", "tiny-random", "--task", "arith", "--estimator", "fzoo", "--n-perturbations", "2",
                      "--batch-size", "2", "--eval-size", "2", "--steps", "1", "--max-new-tokens", "2",
                      "--no-progress", "--output-dir", str(tmp_path / "reward")]) == 0
    config = json.loads((tmp_path / "reward" / "config.json").read_text())  # greedy reward: the ES eps
    assert (config["eps"], config["lr"]) == (GREEDY_REWARD_EPS, pytest.approx(2e-3 * GREEDY_REWARD_EPS))


def test_cli_refuses_another_estimators_setting(tmp_path, capsys):
    from zo_objectives.cli import tune_main

    assert tune_main([*CLI, "--update", "normalized", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--update is not a setting of --estimator fzoo; it takes: --n-perturbations" in capsys.readouterr().err


def test_cli_refuses_a_full_rank_population_before_loading(tmp_path, capsys):
    from zo_objectives.cli import tune_main

    assert tune_main([*CLI[:-4], "--population", "4", "--perturbation-rank", "0", "--output-dir",
                      str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--perturbation-rank 0 (full rank) is FZOO's" in err[0] and "accepted 1" in err[0], err


def test_a_bad_eps_with_the_default_lr_is_refused_naming_eps():
    """The default lr is made from eps: a bad eps must be named, not the lr it would have made."""
    weight = torch.nn.Parameter(torch.zeros(3))
    for eps, message in ((-1e-3, "eps must be > 0"), (0, "eps must be > 0"), ("x", "eps must be a finite number")):
        with pytest.raises(ValueError, match=message):
            FZOO([weight], eps=eps)
