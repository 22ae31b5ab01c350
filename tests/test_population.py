"""The population estimator (zo_objectives.estimators.population): each member's loss from the one batched pass equals
the loss of the model with its perturbation written into the weights; the update is exact (lr 0, exceptions, replay,
resume, bf16 rounding) and points along the gradient; PopulationObjective scores every kind of objective."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import build_small_lm, objective_cases

from zo_objectives.checkpoint import replay
from zo_objectives.estimators import Population
from zo_objectives.objectives import PopulationObjective

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
        for index, p, _ in opt.trainable():
            a, b = opt.factors(seed, index, p)
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
    fewer = lm(dtype)
    with pytest.raises(ValueError, match="replay: the state is of"):  # checked as MeZO's replay checks
        replay(list(fewer.parameters())[1:], state)
    assert same(weights(fewer), base)


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
    cases = objective_cases(tokenizer, extra_row=True)
    opt = Population(small_lm.parameters(), eps=0.05, population=4, perturbation_rank=2)
    seeds = [7, 8]
    for objective, data in cases:
        members = PopulationObjective(objective, 4)
        batched = opt.score(lambda m=members, d=data: m(small_lm, d), seeds)
        alone = _materialized_objective(opt, small_lm, objective, data, seeds)
        assert batched == pytest.approx(alone, abs=1e-4), type(objective).__name__


CLI = ["--model", "tiny-random", "--task", "sst2", "--train-size", "16", "--batch-size", "4", "--no-progress",
       "--eval-size", "4", "--no-eval-before", "--population", "4", "--perturbation-rank", "2", "--lr", "1e-3"]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_cli_trains_records_reruns_and_resumes_a_population(tmp_path, capsys):
    from safetensors.torch import load_file

    from zo_objectives.cli import tune_main

    def tuned(run):
        return load_file(run / "model.safetensors")

    straight, again, resumed = tmp_path / "straight", tmp_path / "again", tmp_path / "resumed"
    assert tune_main([*CLI, "--steps", "3", "--output-dir", str(straight)]) == 0, capsys.readouterr().err
    config = json.loads((straight / "config.json").read_text())
    assert (config["population"], config["perturbation_rank"]) == (4, 2)
    assert config["optimizer"]["population"] == 4
    records = [json.loads(line) for line in (straight / "trajectory.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(len(r["seeds"]) == 2 for r in records)
    assert tune_main(["--config", str(straight / "config.json"), "--output-dir", str(again)]) == 0
    assert tune_main([*CLI, "--steps", "2", "--output-dir", str(resumed)]) == 0
    assert tune_main(["--output-dir", str(resumed), "--resume", "--steps", "3"]) == 0
    base = tuned(straight)
    for run in (again, resumed):
        assert all(torch.equal(base[k], tuned(run)[k]) for k in base), run.name
    assert tune_main([*CLI, "--population", "3", "--output-dir", str(tmp_path / "odd")]) == 2
    assert "--population must be even" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:4 of 8 prompts cut from the left")
def test_cli_population_reward_run(tmp_path, monkeypatch, capsys):
    from zo_objectives.cli import tune_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, **kw):\n"
                                            "    return [1.0 / (1 + len(c)) for c in completions]\n")
    args = [a for a in CLI if a not in ("sst2",)]
    args[args.index("--task") + 1:args.index("--task") + 1] = ["squad"]
    code = tune_main([*args, "--reward", "my_rewards.py:short", "--steps", "1", "--batch-size", "2",
                      "--sample-temperature", "1.0", "--output-dir", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row["rewards"]) == {"short"} and not row["tied"]


def toy_members(model: torch.nn.Module, batch: list[dict], members: int) -> list[float]:
    """Cross-entropy of the toy data per member: the batch repeated once per member, rows grouped by member."""
    x = torch.stack([ex["x"] for ex in batch]).repeat(members, 1)
    labels = torch.tensor([ex["label"] for ex in batch]).repeat(members)
    return F.cross_entropy(model(x), labels, reduction="none").view(members, -1).mean(1).tolist()


def run_population(model: torch.nn.Module, steps: int = 4, die_at: int | None = None) -> Population:
    from test_distributed import DATA

    from zo_objectives.train import train

    opt = Population(model.parameters(), lr=0.05, eps=1e-3, population=8, perturbation_rank=2, seed=3)

    def objective(model, batch):
        if die_at is not None and len(opt.trajectory) == die_at:
            os._exit(3)  # a rank that dies mid-step, without a word
        return toy_members(model, batch, opt.members)

    train(model, opt, objective, DATA, steps=steps, batch_size=5, seed=7, progress=False)
    return opt


def _worker(rank: int, port: int, out_dir: str, die: bool) -> None:
    from test_distributed import WORLD, toy_model

    from zo_objectives import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    distributed.init(backend="gloo")
    model = toy_model()
    began = time.monotonic()
    try:
        opt = run_population(model, die_at=1 if die and rank == 1 else None)
        result = {"weights": [p.detach().clone() for p in model.parameters()], "members": opt.members,
                  "losses": [r["loss"] for r in opt.trajectory]}
    except RuntimeError as err:
        result = {"error": str(err), "seconds": time.monotonic() - began}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _run_ranks(tmp_path, die: bool) -> list[dict]:
    from test_distributed import WORLD, _free_port

    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path), die), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 150  # each process waited on alone: ctx.join would end rank 0 once rank 1 died
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    if any(p.is_alive() for p in ctx.processes):
        for p in ctx.processes:
            p.kill()
        pytest.fail("population workers did not finish in 150 s")
    assert [p.exitcode for p in ctx.processes] == ([0, 3] if die else [0, 0])
    return [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else None
            for r in range(WORLD)]


@pytest.mark.skipif(sys.platform != "linux" or not dist.is_gloo_available(), reason="needs fork and gloo")
def test_two_ranks_split_the_members_and_equal_one_process(tmp_path, capfd):
    from test_distributed import toy_model

    ranks = _run_ranks(tmp_path, die=False)
    single = toy_model()
    initial = [p.detach().clone() for p in single.parameters()]
    opt = run_population(single)
    assert [r["members"] for r in ranks] == [4, 4] and opt.members == 8
    assert "bytes sent per rank per step (a gradient all-reduce would send" in capfd.readouterr().err
    for a, b, c, w0 in zip(ranks[0]["weights"], ranks[1]["weights"], single.parameters(), initial):
        assert torch.equal(a, b) and torch.equal(a, c.detach()) and not torch.equal(a, w0)
    assert ranks[0]["losses"] == [r["loss"] for r in opt.trajectory]


@pytest.mark.skipif(sys.platform != "linux" or not dist.is_gloo_available(), reason="needs fork and gloo")
def test_a_dead_rank_stops_the_others_naming_it(tmp_path):
    ranks = _run_ranks(tmp_path, die=True)
    assert ranks[1] is None  # it died
    assert "rank 0: the population's loss exchange failed" in ranks[0]["error"]
    assert re.search(r"[Rr]ank.{0,3}1", ranks[0]["error"].split("failed", 1)[1]), ranks[0]["error"]
    assert ranks[0]["seconds"] < 90


def test_benchmark_script_runs_on_a_tiny_model(capsys):
    """A smoke run of benchmarks/population.py (one round, nothing written): every table has its rows."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "population.py"
    spec = importlib.util.spec_from_file_location("population_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--model", "tiny-random", "--rows", "4", "--seq-len", "8", "--prompt-len", "4",
                       "--new-tokens", "2", "--populations", "4", "--ranks", "1", "--repeats", "1", "--warmup", "0",
                       "--budgets", "2", "4", "--trials", "2", "--quality-batch", "2"])
    assert [row[:3] for row in out["throughput"]["rows"]] == [["forward", "4", "1"], ["generate", "4", "1"]]
    assert [row[0] for row in out["quality"]["rows"]] == [
        "MeZO n-SPSA, n = 1", "population N = 2, r = 1", "MeZO n-SPSA, n = 2", "population N = 4, r = 1"]
    assert all(-1 <= float(row[2]) <= 1 for row in out["quality"]["rows"])


def test_a_layer_norm_is_refused_with_a_message_and_left_as_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = Population(model.parameters(), population=2)
    before = weights(model)
    with pytest.raises(ValueError, match="LayerNorm.weight .* freeze it"):
        opt.step(lambda: model(torch.ones(2, 4)).sum(-1))
    assert same(weights(model), before) and isinstance(model[1].weight, torch.nn.Parameter)


def test_an_interrupt_inside_a_swapped_norm_leaves_its_weight_as_it_was():
    """A KeyboardInterrupt while a norm runs with its per-row weights swapped in skips the forward hooks: leaving
    the step puts the weight back (the same restore as MeZO's), and the interrupt is what the caller sees."""
    model = lm()
    base = weights(model)
    opt = Population(model.parameters(), lr=1e-2, eps=1e-2, population=4)
    norm = model.model.norm

    def interrupt(module, args):  # runs after the population's hook has swapped the weight in
        assert module.weight.shape == (12, 1, 32)
        raise KeyboardInterrupt

    handle = norm.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: member_losses(model, 4))
    handle.remove()
    assert isinstance(norm.weight, torch.nn.Parameter) and same(weights(model), base) and not opt.trajectory


def test_each_step_is_named_to_its_objective_as_in_mezo():
    """A reward objective keys its sampled candidates and sampling seeds by current_step(): under a population too,
    else a repeated batch would reuse one step's candidates and draw the same samples every step."""
    from zo_objectives.step import current_step

    model = lm()
    opt = Population(model.parameters(), lr=1e-3, population=4, seed=7)
    seen = []

    def closure():
        seen.append(current_step())
        return member_losses(model, 4)

    for _ in range(2):
        opt.step(closure)
    assert seen == [(7, 0), (7, 1)] and current_step() is None
