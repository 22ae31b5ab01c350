"""Populations (zo_objectives.estimators.population): throughput of
scoring N members in one pass, and estimate quality per row.

Throughput: one forward of N members x B examples (the batch repeated once per member, each row block seeing its
member's rank-r perturbation) against one unperturbed forward of the same N*B rows; and sampled generation of
the same rows (every decoding step perturbed per member) against plain batched ``generate``. The two are timed
back to back in each round, the configurations rotating, so that a busy machine slows them alike; the ratio is
the median of the rounds' ratios.

Quality per row: on a Llama small enough for autograd (fp64), the cosine between each estimator's move and the
negative true gradient of the same loss (mean next-token cross-entropy of a fixed batch), at equal rows scored:
MeZO n-SPSA scores 2 n B rows, a population of N members N B rows. Mean and standard deviation over trials
(seeds); random directions in this model's dimension give |cosine| ~ 1/sqrt(parameters).

Quality per time: SST-2 dev accuracy against tuning time, MeZO at ``make run``'s settings against population
settings, each a ``zo-tune`` run in its own process (one thread, evaluating every ``--eval-every`` steps on all
872 dev sentences). Time is the process CPU time of the tuning steps (metrics.jsonl's ``cpu_seconds``, the
evaluations excluded): on a shared machine it counts this run's work, where wall time counts the others' too. A
finished run folder (its eval.json has the result after tuning) is reused and a stopped one resumed, so the
command resumes; the table compares the runs at MeZO's tuning time and at a third of it.

    python benchmarks/population.py                                  # both, SmolLM2-135M throughput
    python benchmarks/population.py --part quality --trials 40
    python benchmarks/population.py --part memory --rows 16 --seq-len 64   # peak RSS against inference
    python benchmarks/population.py --model tiny-random --repeats 1  # a smoke run
    python benchmarks/population.py --write                          # store the JSON and BENCHMARKS.md sections
    python benchmarks/population.py --part throughput --dtype bf16 --suffix _bf16 --write
    python benchmarks/population.py --part throughput --device cuda --rows 1024 --suffix _cuda --write  # a GPU
    python benchmarks/population.py --part time --write              # the runs (hours on a shared CPU), the table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, _relative, forward, publish, setup  # noqa: E402

from zo_objectives.estimators import (
    MeZO,  # noqa: E402
    Population,  # noqa: E402
)
from zo_objectives.estimators.hooks import Members  # noqa: E402
from zo_objectives.noise import mix  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace) -> list[list]:
    model, batch = setup(args.model, args.device, args.threads, args.rows, args.seq_len, dtype=args.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    configs = [(n, r) for n in args.populations for r in args.ranks if args.rows % n == 0]
    gen_ids = batch["input_ids"][:, : args.prompt_len]

    opts = {(n, r): Population(params, lr=0.0, eps=1e-3, population=n, perturbation_rank=r) for n, r in configs}

    def members(n: int, r: int) -> Members:  # the optimizers built once: each builds its noise table on first use
        return Members(opts[(n, r)], [mix(0, k) for k in range(n // 2)])

    def generate() -> None:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.generate(input_ids=gen_ids, attention_mask=torch.ones_like(gen_ids), do_sample=True,
                           temperature=1.0, top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           pad_token_id=0)

    def perturbed(n: int, r: int, fn) -> None:
        with torch.no_grad(), members(n, r):
            fn()

    jobs = {}
    for n, r in configs:
        jobs[("forward", n, r)] = (lambda: forward(model, batch), lambda n=n, r=r: perturbed(
            n, r, lambda: forward(model, batch)))
        if args.new_tokens:
            jobs[("generate", n, r)] = (generate, lambda n=n, r=r: perturbed(n, r, generate))
    ratios: dict[tuple, list[float]] = {key: [] for key in jobs}
    times: dict[tuple, list[tuple[float, float]]] = {key: [] for key in jobs}
    keys = list(jobs)
    for round_ in range(args.warmup + args.repeats):
        for key in keys[round_ % len(keys):] + keys[: round_ % len(keys)]:
            plain, pop = jobs[key]
            t_plain, t_pop = (_time(plain), _time(pop)) if round_ % 2 else tuple(reversed((_time(pop), _time(plain))))
            if round_ >= args.warmup:
                ratios[key].append(t_pop / t_plain)
                times[key].append((t_plain, t_pop))
            print(key, f"{t_plain:.3f} {t_pop:.3f}", file=sys.stderr, flush=True)
    rows = []
    for (kind, n, r), values in ratios.items():
        plain = statistics.median(t for t, _ in times[(kind, n, r)])
        pop = statistics.median(t for _, t in times[(kind, n, r)])
        rows.append([kind, n, r, args.rows // n, args.rows, f"{plain:.3f}", f"{pop:.3f}",
                     f"{statistics.median(values):.3f}"])
    return rows


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).double().eval()


def quality(args: argparse.Namespace) -> list[list]:
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 256, (args.quality_batch, 16), generator=torch.Generator().manual_seed(1))

    def losses(members: int) -> torch.Tensor:
        x = ids.repeat(members, 1)
        logits = model(input_ids=x).logits
        per = F.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1), reduction="none")
        return per.view(members, -1).mean(1)

    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses(1)[0], params)])

    def cosine(make, closure) -> float:
        before = [p.detach().clone() for p in params]
        make().step(closure)
        move = torch.cat([(p.detach() - w).reshape(-1) for p, w in zip(params, before)])
        with torch.no_grad():
            for p, w in zip(params, before):
                p.copy_(w)
        return float(F.cosine_similarity(move, -grad, dim=0))

    estimators = []
    for budget in args.budgets:  # members: rows scored = budget * batch
        estimators.append((f"MeZO n-SPSA, n = {budget // 2}", budget, None, budget // 2))
        estimators += [(f"population N = {budget}, r = {r}", budget, r, None) for r in args.ranks]
    rows = []
    for name, budget, r, n in estimators:
        values = []
        for trial in range(args.trials):
            if r is None:
                values.append(cosine(lambda n=n, t=trial: MeZO(params, lr=1e-3, eps=1e-4, n_perturbations=n, seed=t),
                                     lambda: float(losses(1)[0])))
            else:
                values.append(cosine(lambda b=budget, r=r, t=trial: Population(params, lr=1e-3, eps=1e-4, population=b,
                                                                              perturbation_rank=r, seed=t),
                                     lambda b=budget: losses(b)))
        rows.append([name, budget * args.quality_batch, f"{statistics.mean(values):.4f}",
                     f"{statistics.stdev(values):.4f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


# zo-tune flags beyond make run's defaults (400 steps, batch 16, lr 1e-5, --dtype auto: bf16 here). Population
# settings chosen by reasoning, not on dev: 32 rows per step as MeZO's (N members x B examples = 2 x 16), and
# MeZO's lr times the N/2 pairs averaged per step (the estimate's variance falls by N/2, so the step may grow as
# much, as n-SPSA's does); 600 steps so that each outlasts MeZO's tuning time (a population step costs a little
# less CPU than MeZO's two passes: fewer padded tokens in a batch of 2)
MEZO = "MeZO (make run)"
TIME_RUNS = {
    MEZO: [],
    "population N = 16, r = 1, batch 2, lr 8e-5": ["--population", "16", "--perturbation-rank", "1", "--batch-size",
                                                    "2", "--lr", "8e-5", "--steps", "600"],
    "population N = 4, r = 4, batch 8, lr 2e-5": ["--population", "4", "--perturbation-rank", "4", "--batch-size", "8",
                                                   "--lr", "2e-5", "--steps", "600"],
}


def time_folder(args: argparse.Namespace, name: str) -> Path:
    flags = TIME_RUNS[name]
    short = "mezo" if not flags else f"pop{flags[1]}r{flags[3]}"
    return Path(args.runs) / f"sst2_{short}"


def time_runs(args: argparse.Namespace) -> None:
    """Each configuration's zo-tune run, unless its folder holds the finished run (resumed where it stopped)."""
    for name, flags in TIME_RUNS.items():
        folder = time_folder(args, name)
        if "after" in _read(folder / "eval.json"):
            continue
        resume = ["--resume"] if (folder / "trajectory.json").exists() else ["--overwrite"]
        command = [sys.executable, "-m", "zo_objectives.cli", "--eval-every", str(args.eval_every), "--no-progress",
                   "--output-dir", str(folder), *resume, *flags]
        print(" ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def curve(folder: Path) -> tuple[list[dict], dict]:
    """The run's dev evaluations (step, tuning CPU and wall seconds up to it, accuracy; step 0: before tuning), and
    its steps so far with their total CPU and wall seconds."""
    points, cpu, wall, step = [{"step": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0,
                                "accuracy": _read(folder / "eval.json").get("before")}], 0.0, 0.0, 0
    for line in (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []:
        row = json.loads(line)
        cpu, wall, step = cpu + row["cpu_seconds"], wall + row["seconds"], row["step"]
        if "eval" in row:
            points.append({"step": step, "cpu_seconds": cpu, "wall_seconds": wall, "accuracy": row["eval"]})
    return points, {"steps": step, "cpu_seconds": cpu, "wall_seconds": wall}


def time_table(args: argparse.Namespace) -> tuple[list[list], dict]:
    """MeZO's tuning CPU time for all its steps (from its mean per step while its run is unfinished) and its final
    accuracy (while unfinished: that of the finished make run ``args.target_run``), and each run against them."""
    runs = {name: curve(time_folder(args, name)) for name in TIME_RUNS}
    folder = time_folder(args, MEZO)
    done, planned = runs[MEZO][1], _read(folder / "config.json").get("steps", 400)
    budget = done["cpu_seconds"] / max(1, done["steps"]) * planned
    finished = _read(folder / "eval.json").get("after")
    target = finished if finished is not None else _read(Path(args.target_run) / "eval.json").get("after")
    if target is None or not done["steps"]:
        raise SystemExit(f"population.py: MeZO's run in {folder} has no steps yet, or is unfinished and "
                         f"--target-run {args.target_run} has no final accuracy")

    def at(points: list[dict], total: dict, seconds: float) -> list[str]:
        """The accuracy of the last evaluation within ``seconds`` of tuning CPU time, and its step."""
        point = [p for p in points if p["cpu_seconds"] <= seconds * 1.001][-1]
        short = total["cpu_seconds"] < seconds * 0.98 and point is points[-1]  # the run stopped before it
        return [f"{point['accuracy']:.3f}", f"{point['step']}{' (its last)' if short else ''}"]

    rows = []
    for name, (points, total) in runs.items():
        reached = next((p for p in points if p["step"] and p["accuracy"] >= target), None)
        to_target = ["not reached", "-"] if reached is None else [
            f"{reached['cpu_seconds'] / budget:.2f}", f"{reached['cpu_seconds']:.0f} s (step {reached['step']})"]
        rows.append([name, total["steps"], f"{total['cpu_seconds'] / max(1, total['steps']):.2f}",
                     *at(points, total, budget / 3), *at(points, total, budget), *to_target,
                     f"{total['wall_seconds'] / 60:.1f} min"])
    return rows, {"curves": {name: points for name, (points, _) in runs.items()},
                  "totals": {name: total for name, (_, total) in runs.items()}, "budget_cpu_seconds": budget,
                  "target_accuracy": target, "mezo_finished": finished is not None, "mezo_steps": planned}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("throughput", "quality", "memory", "time", "all"), default="all",
                        help="all: throughput, memory and quality (time runs for hours)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="throughput only")
    parser.add_argument("--populations", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rows", type=int, default=64, help="rows of one pass: N members x rows/N examples")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens of the generation rows")
    parser.add_argument("--new-tokens", type=int, default=8, help="sampled tokens per row (0: no generation rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 8, 32], help="members (rows / batch) compared")
    parser.add_argument("--quality-batch", type=int, default=4)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "population_time"), help="time: the run folders")
    parser.add_argument("--eval-every", type=int, default=50, help="time: steps between dev evaluations")
    parser.add_argument("--target-run", default=str(ROOT / "runs" / "default"),
                        help="time: a finished make run whose final accuracy is the target while MeZO's run is not")
    parser.add_argument("--no-run", action="store_true", help="time: tabulate the runs there are, run nothing")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--suffix", default="", help="appended to the section names (e.g. _cuda)")
    args = parser.parse_args(argv)
    out = {}
    if args.part in ("throughput", "all"):
        rows = throughput(args)
        out["throughput"] = publish(
            f"population_throughput{args.suffix}", f"Population throughput ({args.model})",
            f"One pass over N members x B examples with each member's rank-r perturbation, against the same "
            f"N*B = {args.rows} rows unperturbed ({args.seq_len} tokens, {args.dtype}, the last position's logits); "
            f"sampled generation of {args.new_tokens} tokens after {args.prompt_len}-token prompts, against plain "
            "batched generate. Ratio: median over rounds of perturbed / plain, timed back to back (goals: forward "
            "<= 1.15, generation <= 1.2).",
            ["pass", "N", "r", "B", "rows", "plain s", "population s", "ratio"], rows, args.device, args.write,
            notes="Timed on a shared machine (other jobs running): the ratios, measured back to back, are the "
                  "result; the seconds are not. Peak memory was not measured here.",
            params={"model": args.model, "rows": args.rows, "dtype": args.dtype})
    if args.part in ("memory", "all"):  # benchmarks/memory.py's workers: each configuration in its own process
        import memory

        results = memory.measure(args.model, args.device, args.threads, args.rows, args.seq_len,
                                 ["inference", "population"], steps=2, dtype=args.dtype)
        header, table = memory.rows(results)
        out["memory"] = publish(
            f"population_memory{args.suffix}", f"Population memory ({args.model})",
            f"Peak RSS of a population step (2 members x {args.rows // 2} examples, rank 1) against inference on "
            f"the same {args.rows} rows x {args.seq_len} tokens ({args.dtype}), each in {memory.PROCESSES} fresh "
            "processes, the median reported (benchmarks/memory.py's workers; goal <= 1.05).", header, table,
            args.device, args.write,
            params={"model": args.model, "rows": args.rows})
    if args.part in ("quality", "all"):
        rows = quality(args)
        out["quality"] = publish(
            f"population_quality{args.suffix}", "Population estimate quality per row",
            f"Cosine between the update and the negative true gradient (autograd) of the mean next-token "
            f"cross-entropy of {args.quality_batch} random 16-token sequences, a random 2-layer Llama (hidden 64, "
            f"vocab 256, {sum(p.numel() for p in tiny_llama().parameters()):,} parameters, fp64), over "
            f"{args.trials} seeds. Rows scored: MeZO n-SPSA 2 n B, a population N B.",
            ["estimator", "rows scored", "mean cosine", "sd"], rows, "cpu", args.write,
            params={"trials": args.trials, "batch": args.quality_batch})
    if args.part == "time":
        if not args.no_run:
            time_runs(args)
        rows, data = time_table(args)
        config = _read(time_folder(args, MEZO) / "config.json")
        dtype, machine = config.get("dtype"), config.get("hardware", {})
        budget, steps = data["budget_cpu_seconds"], data["mezo_steps"]
        if data["mezo_finished"]:
            mezo_note = ""
        else:
            done = data["totals"][MEZO]["steps"]
            mezo_note = (f" MeZO's run here stopped at step {done} of {steps} for time: its tuning time for {steps} "
                         f"steps is its mean CPU time per step x {steps}, and the target is the final accuracy of the "
                         f"finished make run in {_relative(args.target_run)} (the same settings; not bitwise the same "
                         "trajectory where the thread count differed).")
        out["time"] = publish(
            "population_time", "Population quality per time (SST-2)",
            f"SmolLM2-135M-Instruct on SST-2 ({dtype}), accuracy objective: dev accuracy (all 872 sentences) at a "
            f"third of MeZO's tuning CPU time and at all of it ({budget:.0f} s for make run's {steps} steps), and "
            f"the CPU time each needs to reach MeZO's final accuracy ({data['target_accuracy']:.3f}); every run has "
            "32 rows per step and the same 1000 training sentences.",
            ["run", "steps run", "CPU s per step", "dev accuracy at 1/3 of MeZO's time", "its step",
             "dev accuracy at MeZO's time", "its step", "time to MeZO's final accuracy, x MeZO's", "CPU seconds",
             "wall time (all steps; shared CPU)"], rows, "cpu", args.write,
            notes="Each run is a zo-tune process with one thread (OMP_NUM_THREADS=1), evaluated every "
                  f"{args.eval_every} steps; times are the process CPU seconds of the tuning steps (metrics.jsonl's "
                  "cpu_seconds: the evaluations excluded), counted on a CPU other jobs shared, which slows a "
                  "thread's work less than its wall time. Accuracies are those of the last evaluation within the "
                  "time ('its last': the run stopped before that time). Population settings were chosen by "
                  "reasoning (MeZO's rows per step; its lr times the pairs averaged), not on dev." + mezo_note
                  + " Runs: " + "; ".join(" ".join(["`zo-tune --eval-every", str(args.eval_every), *f]) + "`"
                                          for f in TIME_RUNS.values()) + ".",
            params={"eval_every": args.eval_every, "runs": TIME_RUNS, **data},
            environment={"hardware": machine["name"], "native_bf16": machine["native_bf16"]} if machine else None)
    return out


if __name__ == "__main__":
    main()
