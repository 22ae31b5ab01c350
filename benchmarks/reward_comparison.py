"""Reward tuning side by side: untuned greedy, best-of-n, MeZO (expected reward over candidates; evolution-strategy
form), a population in evolution-strategy form, TRL's GRPOTrainer and, where gold answers exist, cross-entropy
MeZO; same model, prompts and reward.

Every row is measured the same way: the weighted reward of greedy completions on the task's held-out prompts
(``RewardObjective.evaluate``). Budgets are equal numbers of scored completions (``--completions``): MeZO's
evolution-strategy form scores 2 x batch per step (each perturbed model decodes its own, greedy: with
``n_perturbations`` pairs this is an ES estimate), a population of N members N x batch (all members' completions
decoded in one batched ``generate``, 2 x batch / N prompts per step), the expected reward ``candidates`` x batch, GRPO
``num_generations`` x prompts per step. Each method's learning rate is chosen over a grid of the same size by the
reward on training prompts (never the held-out ones), with seed 0; the chosen one then runs seeds 1 and 2.

Each cell runs in its own subprocess (its peak RSS is the run's memory) and writes one JSON under
``benchmarks/results/reward_comparison/<task>/``; a finished cell is not run again, so the command resumes:

    python benchmarks/reward_comparison.py --task arith --run     # all cells, then the table
    python benchmarks/reward_comparison.py --task arith --write   # the table from the cells that finished

Best-of-n picks each prompt's best sample by the reward itself: an oracle that needs the reward at inference
time (and n completions per prompt), not a tuned model. GRPO needs ``pip install trl`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, publish  # noqa: E402

CELLS_DIR = RESULTS / "reward_comparison"
SEEDS = (0, 1, 2)
EPS = 1e-3  # MeZO's eps when a setting names none
ES = ((3e-4, 1e-3), (1e-3, 1e-3), (3e-4, 1e-2), (1e-3, 1e-2))  # (lr, eps); normalized updates: lr is the step length
# FZOO's step is lr / eps times a normalized estimate (its coefficients are (l_i - l_0) / (eps sigma)): lr x eps is
# the step length of the ES grid's normalized updates, so its grid takes the same step lengths
FZOO_ES = tuple((lr * eps, eps) for lr, eps in ES)
GRZO_ES = tuple((2 * lr * eps, eps) for lr, eps in ES)  # GRZO's step is lr / (2 eps) times a normalized estimate
# Each task's grids, one size for every tuned method of the task: (lr, eps) settings, eps None where it has none
GRIDS = {
    "arith": {"mezo_es": ES, "mezo_expected": ES, "population_es": ES, "fzoo_es": FZOO_ES, "fzoo_lowrank_es": FZOO_ES,
              "grzo_es": GRZO_ES,
              "grpo": ((3e-6, None), (1e-5, None), (4e-5, None), (1e-4, None))},  # Adam
    "squad": {"mezo_es": ES[2:], "mezo_expected": ES[2:], "population_es": ES[2:],  # eps 1e-2: arith's choice
              "grpo": ((1e-5, None), (4e-5, None)),
              "mezo_ce": ((1e-5, EPS), (4e-5, EPS))},  # plain SGD on cross-entropy (the project's CE range)
}
# Also run at GRPO's tuning CPU time ("<method>_time"). SQuAD: the population form only (the example's default):
# each such run takes GRPO's ~29 CPU min, three seeds per form, and the CPU budget held one form.
TIMED = {"arith": ("mezo_es", "population_es", "fzoo_es", "fzoo_lowrank_es", "grzo_es"), "squad": ("population_es",)}
TASKS = {  # reward, gold answers (for cross-entropy), held-out prompts
    "arith": {"reward": "answer_check", "gold": False},
    "squad": {"reward": "token_f1", "gold": True},
}

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="arith", choices=sorted(TASKS))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--held-out", type=int, default=64, help="held-out prompts (the task's dev split, in order)")
    p.add_argument("--train-eval", type=int, default=32, help="training prompts the grid is chosen on")
    p.add_argument("--completions", type=int, default=384, help="scored completions each tuned run may use")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per MeZO evolution-strategy step")
    p.add_argument("--candidates", type=int, default=4, help="sampled completions per prompt (expected reward, "
                                                             "GRPO's num_generations)")
    p.add_argument("--population", type=int, default=8, help="members of the population's evolution-strategy steps")
    p.add_argument("--perturbation-rank", type=int, default=1, help="rank of each population member's perturbation")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--cell", help="run one cell (method:lr:seed[:eps]) and write its JSON")
    p.add_argument("--budget-cpu-seconds", type=float, default=None,
                   help="tune until this much CPU time is used instead of --completions (the equal-time cells)")
    p.add_argument("--run", action="store_true", help="run every cell not yet done, then tabulate")
    p.add_argument("--only", nargs="*", help="with --run: only these methods")
    p.add_argument("--write", action="store_true", help="store the table in BENCHMARKS.md and its JSON")
    p.add_argument("--out", default=None, help="cells folder (default benchmarks/results/reward_comparison/<task>)")
    p.add_argument("--name", default=None, help="the result's name, reward_comparison_<name> (default: the task; "
                                                "another for cells of another --out, e.g. another CPU's)")
    return p.parse_args(argv)


# -- one cell ------------------------------------------------------------------------------------------------
def setup(args: argparse.Namespace):
    import torch

    from metrics.rewards import get_reward
    from tasks import get_task
    from zo_objectives import GenerationPredictor, RewardObjective, load_model

    torch.set_num_threads(1)
    task = get_task(args.task)
    model, tokenizer = load_model(args.model)
    tokens = args.max_new_tokens or task.max_new_tokens
    greedy = GenerationPredictor(tokenizer, max_new_tokens=tokens)
    train = task.examples("train", n=args.completions, seed=0)
    held_out = task.examples("dev", n=args.held_out)
    reward = get_reward(TASKS[args.task]["reward"])
    scorer = RewardObjective(greedy, [reward])
    return task, model, tokenizer, greedy, train, held_out, reward, scorer, tokens


def best_of_n(model, tokenizer, scorer, examples, n: int, seed: int, tokens: int, batch: int = 4) -> float:
    """Mean over prompts of the best reward among n sampled completions (temperature 1, seeded)."""
    from zo_objectives import GenerationPredictor
    from zo_objectives.objectives import reward_columns

    sampler = GenerationPredictor(tokenizer, max_new_tokens=tokens, temperature=1.0, sample_seed=seed)
    best = []
    for start in range(0, len(examples), batch):
        chunk = [ex for ex in examples[start:start + batch] for _ in range(n)]
        prompts = [ex["prompt"] for ex in chunk]
        values = scorer.scores(prompts, sampler.generate(model, prompts), reward_columns(chunk))
        best += [max(values[i:i + n]) for i in range(0, len(values), n)]
    return sum(best) / len(best)


def tune_mezo(method: str, lr: float, eps: float, seed: int, args, model, tokenizer, greedy, train, reward) -> dict:
    """Tune with the budget of scored completions, or with ``args.budget_cpu_seconds``: steps until the tuning
    has used that much CPU time (one thread), a chunk of steps at a time."""
    from zo_objectives import FZOO, GRZO, CrossEntropy, GenerationPredictor, MeZO, Population, RewardObjective
    from zo_objectives import train as run_steps

    if method == "mezo_es":  # each perturbed model decodes its own completions, greedy
        objective, batch, per_step = RewardObjective(greedy, [reward]), args.batch_size, 2 * args.batch_size
        update = "normalized"
    elif method == "population_es":  # as mezo_es, the members' completions decoded in one batched generate
        batch = max(1, 2 * args.batch_size // args.population)
        objective, per_step, update = RewardObjective(greedy, [reward]), args.population * batch, "normalized"
    elif method in ("fzoo_es", "fzoo_lowrank_es"):  # N = --population one-sided members and the unperturbed model,
        # one batched generate; low-rank: each member's matrices moved by rank --perturbation-rank factors, as the
        # population's (no full-rank noise made per member and decoding step)
        batch = max(1, 2 * args.batch_size // args.population)
        objective, per_step, update = RewardObjective(greedy, [reward]), (args.population + 1) * batch, "fzoo"
    elif method == "grzo_es":  # one antithetic pair per prompt (its own direction), one batched generate
        objective, batch, per_step = RewardObjective(greedy, [reward]), args.batch_size, 2 * args.batch_size
        update = "grzo"
    elif method == "mezo_expected":
        sampler = GenerationPredictor(tokenizer, max_new_tokens=greedy.max_new_tokens, temperature=1.0,
                                      sample_seed=seed)
        batch = max(1, 2 * args.batch_size // args.candidates)
        objective, per_step = RewardObjective(sampler, [reward], candidates=args.candidates), batch * args.candidates
        update = "normalized"
    else:  # cross-entropy on the gold answers: no completion is generated or scored while tuning
        objective, batch, per_step, update = CrossEntropy(greedy), args.batch_size, 2 * args.batch_size, "sgd"
    steps = max(1, args.completions // per_step)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "population_es":
        optimizer = Population(params, lr=lr, eps=eps, seed=seed, update=update, population=args.population,
                               perturbation_rank=args.perturbation_rank)
    elif method in ("fzoo_es", "fzoo_lowrank_es"):
        optimizer = FZOO(params, lr=lr, eps=eps, seed=seed, n_perturbations=args.population,
                         perturbation_rank=args.perturbation_rank if method == "fzoo_lowrank_es" else 0)
    elif method == "grzo_es":
        optimizer = GRZO(params, lr=lr, eps=eps, seed=seed, batch_size=batch, perturbation_rank=args.perturbation_rank)
    else:
        optimizer = MeZO(params, lr=lr, eps=eps, seed=seed, update=update)
    history, cpu = [], time.process_time()
    if args.budget_cpu_seconds:  # as many steps as the time allows, 4 at a time (the last 4 may run past it)
        steps = 0
        while time.process_time() - cpu < args.budget_cpu_seconds:
            steps += 4
            history += run_steps(model, optimizer, objective, train, steps=steps, batch_size=batch, seed=seed,
                                 progress=False)
    else:
        history = run_steps(model, optimizer, objective, train, steps=steps, batch_size=batch, seed=seed,
                            progress=False)
    extra = {}
    if isinstance(optimizer, GRZO):
        extra = {"perturbation_rank": optimizer.perturbation_rank}
    elif isinstance(optimizer, Population):
        extra = {"population": args.population, "perturbation_rank": args.perturbation_rank}
    elif isinstance(optimizer, FZOO):
        extra = {"n_perturbations": args.population, "perturbation_rank": optimizer.perturbation_rank}
    return {"steps": steps, "batch": batch, "update": update, "eps": eps, **extra,
            "train_reward_curve": quarters([r.get("train/reward", r.get("reward")) for r in history]),
            "scored_completions": 0 if method == "mezo_ce" else steps * per_step,
            "tied_fraction": sum(r["tied"] for r in history) / len(history)}


def quarters(values: list[float | None]) -> list[float] | None:
    """The mean of each quarter of a run's per-step training rewards (the batches it tuned on): how the reward
    it saw moved while tuning."""
    values = [v for v in values if v is not None]
    if len(values) < 4:
        return None
    n = len(values)
    return [statistics.mean(values[i * n // 4:(i + 1) * n // 4]) for i in range(4)]


def tune_grpo(lr: float, seed: int, args, model, tokenizer, greedy, train, reward) -> dict:
    """TRL's GRPOTrainer on the same prompts and reward (completions cut at the stop string, as ours are)."""
    import tempfile

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def cut(completions: list[str]) -> list[str]:
        return [greedy._cut(c) for c in completions]

    def trl_reward(prompts, completions, **columns):
        return reward(prompts, cut(completions), **columns)

    trl_reward.__name__ = reward.__name__
    rows = [{"prompt": ex["prompt"], **{k: v for k, v in ex["raw"].items() if k != "prompt"},
             **({"answers": ex["answers"]} if ex["answers"] else {})} for ex in train]
    prompts_per_step = max(1, 2 * args.batch_size // args.candidates)
    steps = max(1, args.completions // (prompts_per_step * args.candidates))
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, learning_rate=lr, per_device_train_batch_size=prompts_per_step *
                            args.candidates, num_generations=args.candidates,
                            max_completion_length=greedy.max_new_tokens, max_steps=steps, seed=seed, use_cpu=True,
                            bf16=False, report_to="none", logging_steps=1, save_strategy="no", temperature=1.0,
                            disable_tqdm=True, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        trainer.train()
    model.eval()
    curve = quarters([float(r["reward"]) for r in trainer.state.log_history if "reward" in r])
    return {"steps": steps, "prompts_per_step": prompts_per_step, "scored_completions": steps * prompts_per_step *
            args.candidates, "beta": config.beta, "train_reward_curve": curve}


def run_cell(args: argparse.Namespace) -> dict:
    method, lr, seed, eps = parse_cell(args.cell)
    if method.endswith("_time") != bool(args.budget_cpu_seconds) or (args.budget_cpu_seconds or 0) < 0:
        raise SystemExit(f"reward_comparison: cell {args.cell}: an equal-time cell (<method>_time) needs "
                         "--budget-cpu-seconds > 0, and only such a cell takes it")
    if method.endswith("_time") and method.removesuffix("_time") not in TIMED[args.task]:
        raise SystemExit(f"reward_comparison: cell {args.cell}: {args.task} runs equal-time cells of "
                         f"{', '.join(TIMED[args.task])} only")
    t0 = time.perf_counter()
    task, model, tokenizer, greedy, train, held_out, reward, scorer, tokens = setup(args)
    train_eval = train[: args.train_eval]
    out = {"method": method, "lr": lr, "eps": eps, "seed": seed, "task": args.task, "model": args.model,
           "held_out_prompts": len(held_out), "reward": reward.__name__}
    if method == "greedy":
        out.update(after=scorer.evaluate(model, held_out, greedy)[0], train_after=scorer.evaluate(model, train_eval)[0],
                   scored_completions=len(held_out))
    elif method.startswith("best_of_"):
        n = int(method.rsplit("_", 1)[1])
        out.update(after=best_of_n(model, tokenizer, scorer, held_out, n, seed, tokens),
                   scored_completions=n * len(held_out))
    else:
        tuned, cpu = time.perf_counter(), time.process_time()  # (before tuning: the greedy cell's untuned model)
        if method == "grpo":
            out.update(tune_grpo(lr, seed, args, model, tokenizer, greedy, train, reward))
        else:
            out.update(tune_mezo(method.removesuffix("_time"), lr, eps or EPS, seed, args, model, tokenizer, greedy,
                                 train, reward))
            out["budget_cpu_seconds"] = args.budget_cpu_seconds
        out["tune_seconds"] = time.perf_counter() - tuned
        out["tune_cpu_seconds"] = time.process_time() - cpu  # one thread: the work, whatever else the machine runs
        out["train_after"] = scorer.evaluate(model, train_eval, greedy)[0]
        out["after"] = scorer.evaluate(model, held_out, greedy)[0]
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# -- all cells -----------------------------------------------------------------------------------------------
def cell_name(method: str, setting: tuple[float, float | None], seed: int) -> str:
    """``method:lr:seed``, with ``:eps`` when the setting's eps is not MeZO's default."""
    lr, eps = setting
    return f"{method}:{lr:g}:{seed}" + (f":{eps:g}" if eps not in (None, EPS) else "")


def parse_cell(cell: str) -> tuple[str, float, int, float | None]:
    method, lr, seed, *eps = cell.split(":")
    return method, float(lr), int(seed), float(eps[0]) if eps else None


def cell_path(folder: Path, cell: str) -> Path:
    return folder / (cell.replace(":", "_") + ".json")


def grid_cells(task: str, only: list[str] | None) -> list[str]:
    return [cell_name(m, setting, 0) for m, grid in GRIDS[task].items() if not only or m in only for setting in grid]


def chosen(folder: Path, task: str, method: str, partial: bool = False) -> tuple[float, float | None] | None:
    """The grid's (lr, eps) with the best reward on training prompts (seed 0), once the whole grid has run (with
    ``partial``, among the grid's cells that have)."""
    done = [(setting, json.loads(cell_path(folder, cell_name(method, setting, 0)).read_text()))
            for setting in GRIDS[task][method] if cell_path(folder, cell_name(method, setting, 0)).exists()]
    if not done or (len(done) < len(GRIDS[task][method]) and not partial):
        return None
    return max(done, key=lambda d: d[1]["train_after"])[0]


def seed_cells(folder: Path, method: str, setting: tuple[float, float | None] | None) -> list[dict]:
    """The cells of ``method`` at ``setting`` that finished, in seed order."""
    paths = [cell_path(folder, cell_name(method, setting, s)) for s in SEEDS] if setting else []
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def grpo_cpu_seconds(folder: Path, task: str) -> float | None:
    """GRPO's mean tuning CPU time at its chosen lr once all its seeds ran: the equal-time budget."""
    runs = seed_cells(folder, "grpo", chosen(folder, task, "grpo"))
    times = [r["tune_cpu_seconds"] for r in runs if r.get("tune_cpu_seconds")]
    return statistics.mean(times) if len(runs) == len(SEEDS) and times else None


def run_all(args: argparse.Namespace, folder: Path, argv: list[str]) -> None:
    """The untuned cell, each method's grid then its other seeds at the chosen setting, the equal-time cells
    (``<method>_time``, at the method's chosen setting, once all of GRPO's seeds ran), best-of-n last; ``--only``
    picks methods and their order."""
    base = [a for a in argv if a not in ("--run", "--write")]
    if "--only" in base:
        base = base[: base.index("--only")]
    known = ["greedy", *GRIDS[args.task], *(f"{m}_time" for m in TIMED[args.task]), "best_of_4", "best_of_16"]
    for method in args.only or known:
        if method not in known:
            raise SystemExit(f"reward_comparison: unknown method {method!r}; expected one of {known}")
        tuned = method.removesuffix("_time")
        if method == "greedy" or method.startswith("best_of_"):
            for cell in ["greedy:0:0"] if method == "greedy" else [f"{method}:0:{s}" for s in SEEDS]:
                run_one(base, folder, cell)
        elif tuned == method:  # its grid, then its other seeds at the setting chosen on training prompts
            for cell in grid_cells(args.task, [method]):
                run_one(base, folder, cell)
            setting = chosen(folder, args.task, method)
            for seed in SEEDS[1:] if setting else ():
                run_one(base, folder, cell_name(method, setting, seed))
        elif (budget := grpo_cpu_seconds(folder, args.task)) is None:
            print(f"reward_comparison: {method} waits for all of GRPO's seeds (its time budget)", flush=True)
        elif setting := chosen(folder, args.task, tuned):
            for seed in SEEDS:
                run_one(base, folder, cell_name(method, setting, seed), budget)


def run_one(base: list[str], folder: Path, cell: str, budget: float | None = None) -> None:
    """Run one cell in its own process (its peak RSS is the cell's memory) unless its JSON exists or another
    driver runs it now (its marker names a live driver)."""
    path = cell_path(folder, cell)
    marker = path.with_name(f".{path.stem}.pid")
    folder.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = marker.read_text().strip()
        cmdline = Path(f"/proc/{owner}/cmdline")
        if owner.isdigit() and cmdline.exists() and b"reward_comparison" in cmdline.read_bytes():
            print(f"reward_comparison: {cell} is left to pid {owner}", flush=True)
            return
        marker.unlink(missing_ok=True)  # a stopped driver's: take it over
        return run_one(base, folder, cell, budget)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        print(f"reward_comparison: {cell}", flush=True)
        extra = ["--budget-cpu-seconds", f"{budget:.1f}"] if budget else []
        done = subprocess.run([sys.executable, __file__, *base, *extra, "--cell", cell], check=False)
        if done.returncode:
            print(f"reward_comparison: {cell} failed ({done.returncode})", flush=True)
    finally:
        marker.unlink(missing_ok=True)


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f}" + (f" ± {statistics.stdev(values):.3f} ({len(values)} seeds)" if len(values) > 1 else
                            " (1 seed)")


def cpu_time(values: list[float | None]) -> str:
    """The mean tuning CPU time of the runs that measured it (cells from before it was measured have none)."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return f"{statistics.mean(known) / 60:.1f} min" + ("" if len(known) == len(values) else
                                                      f" ({len(known)} of {len(values)} runs)")


def trl_version() -> str:
    try:
        return version("trl")
    except PackageNotFoundError:  # the tests tabulate without it
        return "(not installed)"


def prompts_seen(cells: list[dict]) -> str:
    """Training prompts a tuned run drew (steps x prompts per step; a prompt drawn again counts again)."""
    per_step = [c.get("batch") or c.get("prompts_per_step") for c in cells]
    if "steps" not in cells[0] or not all(per_step):
        return "-"
    return str(round(statistics.mean(c["steps"] * n for c, n in zip(cells, per_step))))


def setting_text(setting: tuple[float, float | None]) -> str:
    return f"lr {setting[0]:g}" + (f", eps {setting[1]:g}" if setting[1] else "")


def table(folder: Path, task: str) -> tuple[list[str], list[list], dict]:
    cells = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    rows, data = [], {}
    names = {"greedy": "untuned, greedy", "best_of_4": "best of 4 samples (oracle: picked by the reward)",
             "best_of_16": "best of 16 samples (oracle: picked by the reward)",
             "mezo_es": "MeZO, evolution-strategy form (each perturbed model decodes greedily)",
             "population_es": "population, evolution-strategy form (all members decode greedily in one batched "
                              "generate)",
             "fzoo_es": "FZOO, evolution-strategy form (N one-sided members and the unperturbed model decode greedily "
                        "in one batched generate; the step divided by the rewards' spread)",
             "fzoo_lowrank_es": "FZOO with low-rank members (N one-sided members and the unperturbed model decode "
                                "greedily in one batched generate; the step divided by the rewards' spread)",
             "grzo_es": "GRZO, evolution-strategy form (each prompt its own antithetic pair of low-rank members, all "
                        "decoding greedily in one batched generate; the step divided by the spread of the pairs' "
                        "differences)",
             "mezo_expected": "MeZO, expected reward over 4 sampled candidates", "grpo": "TRL GRPOTrainer",
             "mezo_ce": "MeZO, cross-entropy on the gold answers"}
    names.update({f"{m}_time": f"{names[m]}, at GRPO's tuning CPU time" for m in TIMED[task]})
    before = [c["after"] for c in cells.values() if c["method"] == "greedy"]

    def row(method: str, label: str, mine: list[dict], setting_cell: str) -> list:
        if "population" in mine[0]:
            first = mine[0]
            label = label.replace("population,", f"population of {first['population']} (rank "
                                                 f"{first['perturbation_rank']}; {first['batch']} prompts per step),")
        if "n_perturbations" in mine[0]:
            first = mine[0]
            rank = f" of rank {first['perturbation_rank']}" if first.get("perturbation_rank") else ""
            label = label.replace("(N one-sided members", f"({first['n_perturbations']} one-sided members{rank}, "
                                                          f"{first['batch']} prompts per step,")
        if mine[0].get("update") == "grzo":
            first = mine[0]
            label = label.replace("(each prompt", f"({first['batch']} prompts per step, each").replace(
                "low-rank members", f"members of rank {first['perturbation_rank']}")
        afters = [c["after"] for c in mine]
        return [label, f"{before[0]:.3f}" if before and setting_cell != "-" else "-",
                f"{afters[0]:.3f} (greedy: deterministic)" if method == "greedy" else spread(afters), setting_cell,
                round(statistics.mean(c["scored_completions"] for c in mine)),
                f"{statistics.mean(c.get('tune_seconds', c['seconds']) for c in mine) / 60:.1f} min",
                cpu_time([c.get("tune_cpu_seconds") for c in mine]), f"{max(c['peak_rss_mib'] for c in mine):.0f} MiB",
                f"{statistics.mean(c['tied_fraction'] for c in mine):.0%}" if "tied_fraction" in mine[0] else "-",
                len(mine), prompts_seen(mine),
                ", ".join(f"{c['seed']}: {c['after']:.3f}" for c in mine) if len(mine) > 1 else "-"]

    for method, label in names.items():
        base = method.removesuffix("_time")
        grid = GRIDS[task].get(base)
        if not grid:
            mine = [c for c in cells.values() if c["method"] == method]
            if mine:
                rows.append(row(method, label, mine, "-"))
                data[method] = {"after": [c["after"] for c in mine], "seeds": [c["seed"] for c in mine]}
            continue
        setting = chosen(folder, task, base, partial=True)
        ran = sum(cell_path(folder, cell_name(base, g, 0)).stem in cells for g in grid)
        where = f" ({ran} of {len(grid)} grid points ran)"
        timed = [c for c in cells.values() if c["method"] == method]
        if setting is None and method != base and timed:  # equal-time cells at the setting another folder chose
            setting, where = (timed[0]["lr"], timed[0]["eps"]), " (chosen by this grid run on another CPU)"
        mine = seed_cells(folder, method, setting) if setting else []
        if not mine:
            continue
        rows.append(row(method, label, mine, setting_text(setting) + where))
        data[method] = {"setting": setting, "after": [c["after"] for c in mine], "before": before,
                        "seeds": [c["seed"] for c in mine],
                        "tune_cpu_seconds": [c.get("tune_cpu_seconds") for c in mine],
                        "scored_completions": [c["scored_completions"] for c in mine]}
        for other in grid if method == base else ():  # a setting not chosen that ran several seeds (a study)
            theirs = seed_cells(folder, method, other) if other != setting else []
            if len(theirs) > 1:
                rows.append(row(method, label, theirs, setting_text(other) + " (not chosen)"))
    header = ["method", "held-out reward before", "held-out reward after (greedy)",
              "setting (chosen on training prompts)", "scored completions", "time (tuning; shared CPU)",
              "CPU time (tuning, 1 thread)", "peak RSS", "peak RSS / GRPO's", "MeZO steps tied", "runs",
              "training prompts seen", "held-out reward per seed"]
    peak = header.index("peak RSS")
    grpo = [r[peak] for r in rows if r[0] == names["grpo"]]
    for r in rows:  # each row's peak against GRPO's (the goal: a third of it)
        r.insert(peak + 1, f"{float(r[peak].split()[0]) / float(grpo[0].split()[0]):.2f}" if grpo else "-")
    return header, rows, data


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    folder = Path(args.out) if args.out else CELLS_DIR / args.task
    if args.cell:
        folder.mkdir(parents=True, exist_ok=True)
        result = run_cell(args)
        path = cell_path(folder, args.cell)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
        print(json.dumps(result))
        return
    if args.run:
        run_all(args, folder, argv)
    header, rows, data = table(folder, args.task)
    root = RESULTS.parent.parent
    cells_rel = str(folder.resolve().relative_to(root)) if folder.resolve().is_relative_to(root) else str(folder)
    out_flag = f" --out {cells_rel}" if args.out else ""
    notes = ("Held-out figures are the weighted reward of greedy completions on the task's first "
             f"{args.held_out} dev prompts; spreads are the standard deviation over seeds 0-2 (the untuned greedy row "
             "is deterministic). Each tuned method's setting (lr; eps for MeZO's forms) was chosen over a grid of "
             f"the same size by the greedy reward on {args.train_eval} training prompts after tuning with seed 0. "
             f"TRL {trl_version()} GRPOTrainer at its defaults but lr: AdamW over the full fp32 weights, beta 0 "
             "(no reference model), loss 'dapo', gradient checkpointing on (TRL's default, which lowers its peak "
             f"memory), {args.candidates} completions per prompt sampled at temperature 1. "
             "Best-of-n needs the reward at inference "
             "(an oracle) and n completions per prompt. Times and memory come from a CPU shared with other jobs: "
             "they compare only roughly. CPU time is the tuning process's own (one thread), which other jobs inflate "
             "far less than its wall time; cells run before it was recorded have none. The rows 'at GRPO's tuning "
             "CPU time' are the equal-time budget: the method at the setting it chose at equal completions, tuned "
             "until its CPU time reached GRPO's mean tuning CPU time (CPU time stands for wall time because the "
             "machine ran other jobs beside every cell; on this task for "
             f"{' and '.join(TIMED[args.task])}, each run taking GRPO's CPU time)" +
             ("" if any(m.endswith("_time") for m in data) else "; not run on this task within the CPU budget") +
             ". FZOO's grid takes the ES grid's step lengths (its lr is the ES lr x eps: its step is lr / eps "
             "along a normalized estimate); its N members and the unperturbed model score 2 x batch / N prompts "
             "each per step. Rows marked 'not chosen' are other settings of the grid run with several seeds. The "
             "population row: N members at rank r score 2 x batch / N prompts each per step, the members' "
             "completions decoded in one batched generate. The cells ran as "
             f"`python benchmarks/reward_comparison.py --task {args.task}{out_flag} --run` (resumable: one JSON per "
             f"cell under {cells_rel}/, seed 0 grid cells included); rows with fewer runs "
             "or grid points than the others stopped for time.")
    name = args.name or args.task
    publish(f"reward_comparison_{name}", f"Reward comparison ({name})",
            f"{args.model} on {args.task}, reward {TASKS[args.task]['reward']}, {args.completions} scored completions "
            "per tuned run.", header, rows, "cpu", args.write, notes=notes,
            params={"task": args.task, "cells": cells_rel, "data": data, "completions": args.completions,
                    "held_out": args.held_out})


if __name__ == "__main__":
    main()
