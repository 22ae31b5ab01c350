"""The MeZO paper's comparison (its Table 1, with the LoRA and prefix rows) on the shipped tasks, at a budget a
shared CPU finishes: zero-shot, in-context learning, linear probing, fine-tuning with backpropagation (full and
LoRA) and MeZO (cross-entropy, the task's metric, LoRA, prefix), each with its peak memory and wall time.

Every (task, method) cell runs in its own process and writes ``benchmarks/results/seed_table/<task>__<method>.json``
when it finishes; a finished cell is never run again, and a MeZO cell stopped half-way resumes from its run
folder's checkpoint (``runs/seed_table/``). The table is then written from whatever cells have finished; the others
say why they are missing.

    python benchmarks/seed_table.py --workers 2              # run the missing cells (cheapest first), then the table
    python benchmarks/seed_table.py --cell sst2/mezo-ce      # one cell: the command printed beside it
    python benchmarks/seed_table.py --cells cb/mezo-ce,rte/icl --workers 1   # these missing cells, in this order
    python benchmarks/seed_table.py --table --write          # BENCHMARKS.md section, seed_table.json and the plots
    python benchmarks/seed_table.py --cell squad/mezo-ce --steps 300   # a MeZO cell run on, toward its plateau

A longer run (``--steps`` above the table's 100) continues the cell's own finished run from a copy of its folder:
the steps' seeds and the constant lr do not depend on ``--steps``, so it is the run the cell would have been with
more steps (without that folder, as on a fresh clone, it runs from step 0: its first 100 steps are the cell's).
It is stored beside the cells (``<task>__<method>__<steps>.json``), listed under the table and drawn on the task's
plot.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, markdown_table, publish, write_section  # noqa: E402
from memory import current_rss_kib, page_in, release_freed, reset_peak  # noqa: E402

README = ROOT / "README.md"
CELLS = RESULTS / "seed_table"  # one JSON per finished cell (and per longer run)
RUNS = ROOT / "runs" / "seed_table"  # MeZO run folders (checkpoints, weights) and each cell's log; not committed
PLUGIN = "benchmarks/seed_tasks.py"  # registers cb_split (CB's 32 rows split 16 train / 16 dev)
MODEL = "smollm2-135m"

# Columns: the shipped tasks, cheapest first (the order cells run in); CB through its held-out split
TASKS = {"cb": "cb_split", "copa": "copa", "sst2": "sst2", "rte": "rte", "boolq": "boolq", "squad": "squad"}
DEV = {"cb": 16, "copa": 100, "sst2": 200, "rte": 200, "boolq": 200, "squad": 100}  # dev examples scored
TRAIN = 32  # training examples: the seed's few-shot setting k=16 (16 per class for a binary task, on average)
SHOTS = 4  # in-context demonstrations (README's ICL setting, zo-eval --shots)
STEPS, BATCH, EVAL_EVERY = 100, 16, 20  # MeZO: steps x batch (50 epochs of 32 examples), dev curve points
EPOCHS, FT_BATCH = 5, 8  # backprop: the seed's 5 epochs (OPT), batch 8
FT_LR = {"backprop": 1e-5, "backprop-lora": 1e-4}  # the seed's AdamW lrs for OPT full / LoRA fine-tuning

# Rows: method -> what it is. MeZO rows run in bf16 (this CPU has bf16 arithmetic; eps 3e-3, the bf16 default,
# matched fp32 over four seeds: docs/half_precision.md); the others in bf16 too (backprop: bf16 autocast over
# fp32 weights and AdamW states, as mixed-precision fine-tuning keeps them).
METHODS = {
    "zero-shot": "zero-shot",
    "icl": f"in-context learning ({SHOTS} demonstrations)",
    "linear-probe": "linear probing (logistic regression on the last layer at the prediction position)",
    "backprop": "fine-tuning, backprop (AdamW, full parameters)",
    "backprop-lora": "fine-tuning, backprop (AdamW, LoRA r=8)",
    "mezo-ce": "MeZO, cross-entropy",
    "mezo-metric": "MeZO, the task's metric (expected metric, mean form, T = 1)",
    "mezo-lora": "MeZO (LoRA r=8), cross-entropy",
    "mezo-prefix": "MeZO (prefix, 5 tokens), cross-entropy",
}
# Each MeZO row's zo-tune flags beyond the shared ones: the project's defaults for full-parameter MeZO in bf16
# (lr 1e-5 cross-entropy, 1e-4 mean form; eps 3e-3), the seed's lr and eps for LoRA (1e-4, 1e-2) and prefix
# (1e-3, 1e-1) tuning
MEZO = {
    "mezo-ce": ["--objective", "cross_entropy"],
    "mezo-metric": ["--metric-form", "mean"],
    "mezo-lora": ["--objective", "cross_entropy", "--peft", "lora", "--lr", "1e-4", "--eps", "1e-2"],
    "mezo-prefix": ["--objective", "cross_entropy", "--peft", "prefix", "--lr", "1e-3", "--eps", "1e-1"],
}
SKIP = {("squad", "linear-probe"): "not applicable: extractive QA has no classes or candidates to probe"}


def _longer(steps: int | None) -> bool:
    """Whether ``steps`` names a longer run (None or the table's steps: the cell itself)."""
    return steps not in (None, STEPS)


def cell_path(task: str, method: str, steps: int | None = None) -> Path:
    """A cell's result; with ``steps`` (above the table's), a longer run's."""
    return CELLS / (f"{task}__{method}__{steps}.json" if _longer(steps) else f"{task}__{method}.json")


def cell_command(task: str, method: str, steps: int | None = None) -> str:
    more = f" --steps {steps}" if _longer(steps) else ""
    return f"python benchmarks/seed_table.py --cell {task}/{method}{more}"


def run_dir(task: str, method: str, steps: int | None = None) -> Path:
    return RUNS / (f"{task}-{method}-{steps}" if _longer(steps) else f"{task}-{method}")


def mezo_argv(task: str, method: str, steps: int | None = None) -> list[str]:
    """The zo-tune flags of a MeZO cell (of a longer run with ``steps``)."""
    return ["--plugin", PLUGIN, "--model", MODEL, "--task", TASKS[task], "--dtype", "bf16", "--device", "cpu",
            "--train-size", str(TRAIN), "--eval-size", str(DEV[task]), "--batch-size", str(BATCH), "--steps",
            str(steps or STEPS), "--eval-every", str(EVAL_EVERY), "--no-progress", "--output-dir",
            _shown(run_dir(task, method, steps)), *MEZO[method]]


def _shown(path: Path) -> str:
    """A path as a command shows it: from the repository root when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# -- the methods ----------------------------------------------------------------------------------------------
LOADED: dict[str, float] = {}  # the RSS once the model is loaded, from which the cell's peak is measured


def measured(load_model):
    """``load_model`` that, once the model is resident, resets the RSS high-water mark (as benchmarks/memory.py
    does): a cell's peak is then its method's, not the fp32 file's read while loading a bf16 model."""

    def load_then_reset(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        page_in(model)
        release_freed()
        LOADED["rss_kib"], LOADED["peak_reset"] = current_rss_kib(), reset_peak()
        return model, tokenizer

    return load_then_reset


def load(task: str, dtype: str = "bf16"):
    """(task, model, tokenizer, predictor, metric, train examples, dev examples) of a cell."""
    import seed_tasks  # noqa: F401  (registers cb_split)

    from metrics import get_metric
    from tasks import get_task
    from zo_objectives.models import load_model
    from zo_objectives.scoring import predictor_for

    spec = get_task(TASKS[task])
    model, tokenizer = measured(load_model)(MODEL, dtype=dtype)
    return (spec, model, tokenizer, predictor_for(spec, tokenizer, model=model), get_metric(spec.metric),
            spec.examples("train", n=TRAIN, seed=0), spec.examples("dev", n=DEV[task]))


def evaluate(task: str, shots: int) -> dict:
    """Zero-shot or in-context learning: ``zo-eval`` itself."""
    import seed_tasks  # noqa: F401

    from zo_objectives.cli import eval_parser, evaluate_run
    from zo_objectives.config import EvalConfig

    argv = ["--plugin", PLUGIN, "--model", MODEL, "--task", TASKS[task], "--dtype", "bf16", "--device", "cpu",
            "--eval-size", str(DEV[task]), *(["--shots", str(shots)] if shots else [])]
    result = evaluate_run(EvalConfig(**eval_parser().given(argv)[1]))
    return {"value": result["value"], "examples": result["examples"], "equivalent": "zo-eval " + " ".join(argv)}


def features(model: torch.nn.Module, tokenizer, texts: list[str], group: int = 16) -> torch.Tensor:
    """The last layer's hidden state at each text's last token (where the label word or answer is predicted)."""
    from zo_objectives.scoring import left_pad

    out = []
    for start in range(0, len(texts), group):
        seqs = [tokenizer.encode(t, add_special_tokens=False) for t in texts[start:start + group]]
        ids, mask, positions = left_pad(seqs, tokenizer.pad_token_id)
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
        out.append(hidden[:, -1].float())
    return torch.cat(out)


def linear_probe(task: str) -> dict:
    """Logistic regression on frozen features: of the prompt (classification), or of prompt + candidate, labelled
    correct or not, the best-scoring candidate predicted (multiple choice)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    spec, model, tokenizer, _, metric, train_set, dev_set = load(task)

    def table(examples: list[dict]) -> tuple[torch.Tensor, list[int], list[int]]:
        if spec.kind == "classification":
            return features(model, tokenizer, [ex["prompt"] for ex in examples]), [ex["label"] for ex in examples], []
        texts = [ex["prompt"] + c for ex in examples for c in ex["candidates"]]
        labels = [int(i == ex["label"]) for ex in examples for i in range(len(ex["candidates"]))]
        return features(model, tokenizer, texts), labels, [len(ex["candidates"]) for ex in examples]

    x, y, _ = table(train_set)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x.numpy(), y)
    dx, _, sizes = table(dev_set)
    if spec.kind == "classification":
        predictions = probe.predict(dx.numpy()).tolist()
    else:
        scores, predictions, at = probe.decision_function(dx.numpy()), [], 0
        for n in sizes:
            predictions.append(int(scores[at:at + n].argmax()))
            at += n
    return {"value": metric(predictions, [ex["label"] for ex in dev_set]), "examples": len(dev_set)}


def continuation_logprobs(model: torch.nn.Module, tokenizer, prompts: list[str], continuations: list[str],
                          per_token: bool) -> torch.Tensor:
    """Differentiable log-likelihood of each continuation after its prompt (mean per token with ``per_token``),
    scored as ``Predictor.continuation_logprobs`` scores it without gradients."""
    from zo_objectives.scoring import left_pad

    conts = [tokenizer.encode(c, add_special_tokens=False) for c in continuations]
    seqs = [tokenizer.encode(p, add_special_tokens=False) + c for p, c in zip(prompts, conts)]
    ids, mask, positions = left_pad(seqs, tokenizer.pad_token_id)
    keep = max(map(len, conts)) + 1
    logp = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                 logits_to_keep=keep).logits[:, :-1].float().log_softmax(-1)
    out = [logp[row, -len(c):].gather(-1, ids[row, -len(c):, None]).sum() / (len(c) if per_token else 1)
           for row, c in enumerate(conts)]
    return torch.stack(out)


def backprop_loss(model: torch.nn.Module, tokenizer, kind: str, batch: list[dict]) -> torch.Tensor:
    """The cross-entropy MeZO's cross-entropy rows optimize, with gradients: over the label words or candidates
    (mean per token for candidates, as ChoicePredictor scores them), of the gold answer for generation."""
    if kind == "generation":
        return -continuation_logprobs(model, tokenizer, [ex["prompt"] for ex in batch],
                                      [ex["target"] for ex in batch], per_token=True).mean()
    pairs = [(ex["prompt"], c) for ex in batch for c in ex["candidates"]]
    scores = continuation_logprobs(model, tokenizer, *map(list, zip(*pairs)), per_token=kind == "multiple_choice")
    losses, at = [], 0
    for ex in batch:
        n = len(ex["candidates"])
        losses.append(torch.nn.functional.cross_entropy(scores[at:at + n][None], torch.tensor([ex["label"]])))
        at += n
    return torch.stack(losses).mean()


def backprop(task: str, method: str) -> dict:
    """AdamW for ``EPOCHS`` epochs of the training examples in batches of ``FT_BATCH``, bf16 autocast over fp32
    weights (full parameters, or a LoRA adapter); then the dev metric, under the same autocast."""
    import random

    from zo_objectives.evaluate import evaluate_model
    from zo_objectives.models import apply_peft
    from zo_objectives.scoring import model_device

    spec, model, tokenizer, predictor, metric, train_set, dev_set = load(task, dtype="fp32")
    if method == "backprop-lora":
        model = apply_peft(model, "lora")
    model_device(model)  # its LM head gets a contiguous input, as in scoring (a frozen head's slow path otherwise)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=FT_LR[method])
    order, losses = list(range(len(train_set))), []
    model.train()
    for epoch in range(EPOCHS):
        random.Random(epoch).shuffle(order)
        for start in range(0, len(order), FT_BATCH):
            batch = [train_set[i] for i in order[start:start + FT_BATCH]]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = backprop_loss(model, tokenizer, spec.kind, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = evaluate_model(model, predictor, dev_set, metric)
    return {"value": value, "examples": len(dev_set), "train_losses": losses,
            "trainable_parameters": sum(p.numel() for p in params)}


def mezo(task: str, method: str, steps: int | None = None) -> dict:
    """A zo-tune run (resumed from its checkpoint when a previous attempt was stopped); its dev curve. A longer run
    (``steps``) starts from a copy of the cell's finished run folder where there is one."""
    from zo_objectives.cli import tune_main

    argv = mezo_argv(task, method, steps)
    run = ROOT / argv[argv.index("--output-dir") + 1]
    cell_run, tmp = run_dir(task, method), run.with_name(run.name + ".tmp")
    if _longer(steps) and not run.exists() and (cell_run / "eval.json").exists() and (
            curve(cell_run)["last_step"] == STEPS):  # a copy of the cell's finished run, whole or not at all
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted copy
        shutil.copytree(cell_run, tmp)
        tmp.rename(run)
    resume = (run / "trajectory.json").exists() and (run / "eval.json").exists()
    done = curve(run)["last_step"] if resume else 0  # steps an earlier, stopped attempt ran (not in wall_s)
    code = tune_main([*argv, "--resume" if resume else "--overwrite"])
    if code in (130, 143):  # Ctrl-C or SIGTERM: stopped, not failed (no traceback in the log); it resumes
        raise SystemExit(f"zo-tune stopped by a signal (exit {code}); the cell resumes from its checkpoint")
    if code != 0:
        raise RuntimeError(f"zo-tune exited with {code}")
    return {**curve(run), "equivalent": "zo-tune " + " ".join(shlex.quote(a) for a in argv), "resumed_at_step": done}


def curve(run: Path) -> dict:
    """A MeZO run's dev metric against steps (0: before tuning), its result, config and last step."""
    summary = json.loads((run / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    points = ([[0, summary["before"]]] if summary.get("before") is not None else []) + [
        [r["step"], r["eval"]] for r in rows if "eval" in r]
    config = json.loads((run / "config.json").read_text())
    return {"value": summary.get("after"), "examples": summary["examples"], "curve": points,
            "last_step": rows[-1]["step"] if rows else 0, "lr": config["lr"], "eps": config["eps"],
            "tied_fraction": summary.get("tied_fraction"), "trainable_parameters": config["trainable_parameters"]}


def run_cell(task: str, method: str, steps: int | None = None) -> dict:
    """Run one cell (a MeZO cell for ``steps``, when given) in this process; write and return its result."""
    from zo_objectives import cli

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.chdir(ROOT)  # the plugin and run folders are named from the repository root
    cli.load_model = measured(cli.load_model)  # zo-eval and zo-tune cells load through it
    t0 = time.perf_counter()
    if method in ("zero-shot", "icl"):
        result = evaluate(task, SHOTS if method == "icl" else 0)
    elif method == "linear-probe":
        result = linear_probe(task)
    elif method.startswith("backprop"):
        result = backprop(task, method)
    else:
        result = mezo(task, method, steps)
    from tasks import get_task

    result.update(task=task, method=method, command=cell_command(task, method, steps), wall_s=time.perf_counter() - t0,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  loaded_rss_mib=LOADED.get("rss_kib", 0) / 1024, peak_reset=LOADED.get("peak_reset", False),
                  train_examples=len(get_task(TASKS[task]).examples("train", n=TRAIN, seed=0)),
                  date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    CELLS.mkdir(parents=True, exist_ok=True)
    tmp = cell_path(task, method, steps).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(cell_path(task, method, steps))
    return result


# -- the driver -----------------------------------------------------------------------------------------------
def queue() -> list[tuple[str, str]]:
    """Missing cells, cheapest first: the tasks with short prompts (their evaluations, then SST-2's and COPA's
    training rows), then the longer ones, SQuAD (generation, the longest prompts) last."""
    cheap = ("zero-shot", "icl", "linear-probe")
    order = [(t, m) for t in ("cb", "copa", "sst2", "rte") for m in cheap]
    order += [(t, m) for t in ("sst2", "copa") for m in METHODS if m not in cheap]
    order += [("squad", "zero-shot")] + [("boolq", m) for m in cheap]
    order += [(t, m) for t in ("cb", "rte", "boolq", "squad") for m in METHODS if m not in cheap]
    order += [("squad", "icl")]
    return [(t, m) for t, m in order if (t, m) not in SKIP and not cell_path(t, m).exists()]


def live_cells() -> set[tuple[str, str]]:
    """Cells whose process (named in RUNS/logs/<task>__<method>.pid by the driver that started it) still runs."""
    live = set()
    for path in (RUNS / "logs").glob("*.pid"):
        try:
            os.kill(int(path.read_text()), 0)
            live.add(tuple(path.stem.split("__")))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    return live


def drive(workers: int, cells: list[tuple[str, str]]) -> None:
    """Run those of ``cells`` that are missing, in order, at most ``workers`` processes at a time, each logging to
    RUNS/logs. Cells another driver still runs (a driver stopped and restarted) count toward ``workers`` and are
    left to it."""
    (RUNS / "logs").mkdir(parents=True, exist_ok=True)
    pending = [c for c in cells if c not in SKIP and not cell_path(*c).exists()]
    running: list[tuple[subprocess.Popen, str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    while pending or running or live_cells():
        others = live_cells() - {tuple(name.split("/")) for _, name in running}
        pending = [c for c in pending if c not in others and not cell_path(*c).exists()]
        while pending and len(running) + len(others) < workers:
            task, method = pending.pop(0)
            log = open(RUNS / "logs" / f"{task}__{method}.log", "a")
            proc = subprocess.Popen([sys.executable, __file__, "--cell", f"{task}/{method}"], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            (RUNS / "logs" / f"{task}__{method}.pid").write_text(str(proc.pid))
            print(f"{time.strftime('%H:%M:%S')} started {task}/{method} (pid {proc.pid})", flush=True)
            running.append((proc, f"{task}/{method}"))
        time.sleep(5)
        for proc, name in [r for r in running if r[0].poll() is not None]:
            running.remove((proc, name))
            (RUNS / "logs" / f"{name.replace('/', '__')}.pid").unlink(missing_ok=True)
            print(f"{time.strftime('%H:%M:%S')} {name} exited {proc.returncode}", flush=True)


# -- the table ------------------------------------------------------------------------------------------------
def slope(points: list[list[float]]) -> float | None:
    """Least-squares slope of the dev metric (x 100) per 100 steps over the curve's last quarter of steps (at
    least its last three points): near 0 at a plateau."""
    if len(points) < 3:
        return None
    last = points[-1][0]
    tail = [p for p in points if p[0] >= 0.75 * last]
    tail = tail if len(tail) >= 3 else points[-3:]
    xs, ys = [p[0] for p in tail], [100 * p[1] for p in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@functools.cache
def tokens(task: str) -> tuple[float, float]:
    """Mean tokens one forward pass reads per training and per dev example of ``task``: the prompt, with its
    candidates (multiple choice) or its answer (generation)."""
    import seed_tasks  # noqa: F401

    from tasks import get_task
    from zo_objectives.models import load_model

    spec, tokenizer = get_task(TASKS[task]), load_model(MODEL)[1]

    def mean(examples: list[dict]) -> float:
        rest = [ex.get("candidates") if spec.kind == "multiple_choice" else [ex["target"]] for ex in examples]
        texts = [[ex["prompt"], *(r if spec.kind != "classification" else [])] for ex, r in zip(examples, rest)]
        return sum(len(tokenizer.encode(t, add_special_tokens=False)) for ts in texts for t in ts) / len(texts)

    return mean(spec.examples("train", n=TRAIN, seed=0)), mean(spec.examples("dev", n=DEV[task]))


# The fixed cost of one example's forward pass beside its tokens' (a share of the pass over the weights and, in
# MeZO, of the perturbation's), in tokens: MeZO steps on COPA and CB (32 sequences of 21 and 93 tokens) took
# 1.9 s and 4.1 s on this CPU, 0.96 ms per token and 40 tokens' worth per sequence
OVERHEAD = 40


def work(task: str, method: str) -> float:
    """What a cell's time scales with: the tokens its forward passes read, each pass also counted as ``OVERHEAD``
    tokens (a backward pass counted as two forwards)."""
    train, dev = (n + OVERHEAD for n in tokens(task))
    if method in MEZO:  # two forward passes per example per step, and the dev set at every curve point
        return 2 * STEPS * BATCH * train + (STEPS // EVAL_EVERY + 1) * DEV[task] * dev
    if method.startswith("backprop"):
        return 3 * EPOCHS * TRAIN * train + DEV[task] * dev
    if method == "icl":  # each dev prompt holds SHOTS training examples
        return DEV[task] * (dev + SHOTS * (train - OVERHEAD))
    return DEV[task] * dev + (TRAIN * train if method == "linear-probe" else 0)


def family(method: str) -> str:
    return "mezo" if method in MEZO else "backprop" if method.startswith("backprop") else "evaluation"


def estimate(task: str, method: str, cells: dict) -> float | None:
    """Minutes a cell would take at the fastest pace of the finished cells of its row (else of its family: MeZO,
    backprop, evaluation) on this machine, their least contended: seconds per unit of ``work``, times the cell's."""
    for same in (lambda m: m == method, lambda m: family(m) == family(method)):
        rates = [c["wall_s"] / work(t, m) for (t, m), c in cells.items() if same(m) and not c.get("resumed_at_step")]
        if rates:
            return min(rates) * work(task, method) / 60
    return None


def missing(task: str, method: str, cells: dict) -> str:
    """Why a cell has no result: not applicable, failed (its log ends in a traceback), or not run (or not
    finished) within the CPU budget, with the time it would take."""
    if (task, method) in SKIP:
        return SKIP[(task, method)]
    run, log = RUNS / f"{task}-{method}", RUNS / "logs" / f"{task}__{method}.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    if "Traceback (most recent call last):" in lines:  # the cell's process raised: say so, with its error
        return f"failed: {lines[-1].strip()[:80]} ({log.relative_to(ROOT)})"
    minutes = estimate(task, method, cells)
    needs = "" if minutes is None else f"~{minutes:.0f} min estimated on this CPU"
    if method in MEZO and (run / "metrics.jsonl").exists():
        steps = sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip())
        return f"not finished: CPU budget (stopped at step {steps} of {STEPS}; the whole cell: {needs or '?'})"
    return f"not run: CPU budget ({needs})" if needs else "not run: CPU budget"


def longer_runs(task: str, longer: dict) -> dict[tuple[str, int], tuple[list, str]]:
    """Curves of ``task``'s longer runs: finished (``longer``: (task, method, steps) -> result), else stopped
    (from their run folders): (method, steps) -> (points, how it ended)."""
    found = {(m, n): (c["curve"], "") for (t, m, n), c in longer.items() if t == task}
    for method in MEZO:
        for run in sorted(RUNS.glob(f"{task}-{method}-*")):
            steps = run.name.rsplit("-", 1)[1]
            if steps.isdigit() and (method, int(steps)) not in found and (run / "eval.json").exists():
                stopped = curve(run)
                found[(method, int(steps))] = (stopped["curve"], f" (stopped at step {stopped['last_step']})")
    return found


def plot(task: str, cells: dict, longer: dict | None = None) -> Path | None:
    """The MeZO rows' dev metric against steps for one task (PNG), with its longer runs dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {m: (cells[(task, m)]["curve"], "") for m in MEZO if (task, m) in cells}
    for method in MEZO:  # a run stopped by the budget: its curve so far, from its run folder
        run = RUNS / f"{task}-{method}"
        if method not in curves and (run / "eval.json").exists() and (run / "metrics.jsonl").exists():
            stopped = curve(run)
            curves[method] = (stopped["curve"], f" (stopped at step {stopped['last_step']})")
    extended = longer_runs(task, longer or {})
    if not any(points for points, _ in [*curves.values(), *extended.values()]):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colors = {}
    for method, (points, stopped) in curves.items():
        line, = ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o",
                        label=METHODS[method] + stopped)
        colors[method] = line.get_color()
    for (method, steps), (points, stopped) in extended.items():  # its steps past the cell's, in the cell's colour
        on = [p for p in points if p[0] >= STEPS]
        ax.plot([p[0] for p in on], [100 * p[1] for p in on], ls="--", marker=".", color=colors.get(method),
                label=f"{METHODS[method]}, run on to {steps} steps{stopped}")
    for method in ("zero-shot", "icl", "backprop"):
        if (task, method) in cells:
            ax.axhline(100 * cells[(task, method)]["value"], ls=":", lw=1, color="grey")
            ax.annotate(method, (0, 100 * cells[(task, method)]["value"]), fontsize=7, color="grey")
    ax.set(xlabel="MeZO step (batch 16)", ylabel=f"dev metric x 100 ({DEV[task]} examples)",
           title=f"{MODEL}, {task}: MeZO rows, {TRAIN} training examples, bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / f"seed_table_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def glance(result: dict) -> str:
    """The at-a-glance grid of a stored result (README's and the section's): the dev metric of each method (rows)
    on each task (columns), "-" where no cell finished (the full table says why, with its estimate and command),
    "n/a" where the method does not apply."""
    at = {(r[0], r[1]): r[result["columns"].index("dev metric")] for r in result["rows"]}
    shown = {cell: "n/a" if value.startswith("not applicable") else value if value[:1].isdigit() else "-"
             for cell, value in at.items()}
    return markdown_table(["row", *TASKS], [[method, *(shown[(t, method)] for t in TASKS)] for method in METHODS])


def memory_ratios(result: dict) -> str:
    """Each task's peak RSS of backprop (full parameters) over MeZO's (cross-entropy), where both finished."""
    column = result["columns"].index("peak RSS MiB")
    peak = {(r[0], r[1]): float(r[column]) for r in result["rows"] if r[column][:1].isdigit()}
    return ", ".join(f"{t} {peak[(t, 'backprop')] / peak[(t, 'mezo-ce')]:.1f}x" for t in TASKS
                     if (t, "backprop") in peak and (t, "mezo-ce") in peak) or "not measured yet"


def table(write: bool) -> dict:
    """The result from the finished cells: one row per cell, with the at-a-glance grid in the notes (and, with
    ``write``, in README)."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(CELLS.glob("*.json"))}
    cells = {(c["task"], c["method"]): c for name, c in found.items() if name.count("__") == 1}
    longer = {(c["task"], c["method"], int(name.rsplit("__", 1)[1])): c for name, c in found.items()
              if name.count("__") == 2}
    rows = []
    for method, what in METHODS.items():
        for task in TASKS:
            c = cells.get((task, method))
            if c is None:
                rows.append([task, method, what, missing(task, method, cells), "-", "-", "-", "-", "-",
                             f"`{cell_command(task, method)}`"])
                continue
            points, resumed = c.get("curve", []), c.get("resumed_at_step")
            s = slope(points)
            wall = f"{c['wall_s'] / 60:.1f}" + (f" (resumed at step {resumed})" if resumed else "")
            moved = f"{100 * (points[-1][1] - points[0][1]):+.1f}" if len(points) > 1 and points[0][0] == 0 else "-"
            rows.append([task, method, what, f"{100 * c['value']:.1f}", f"{c['peak_rss_mib']:.0f}", wall,
                         "-" if s is None else f"{s:+.1f}", moved, f"{c.get('trainable_parameters', '-')}",
                         f"`{c['command']}`"])
    plots = [p for p in (plot(t, cells, longer) for t in TASKS) if p]
    header = ["task", "row", "method", "dev metric", "peak RSS MiB", "wall min", "slope per 100 steps",
              "change from step 0", "trainable parameters", "command"]
    at_a_glance, ratios = glance({"columns": header, "rows": rows}), memory_ratios({"columns": header, "rows": rows})
    notes = (
        f"At a glance (dev metric x 100: accuracy; SQuAD: F1; -: no result, the full table says why; dev examples: "
        f"{', '.join(f'{t} {n}' for t, n in DEV.items())}):\n\n{at_a_glance}\n\n"
        f"Budget (a 2-core CPU shared with other jobs): {TRAIN} training examples per task (seed 0; the seed's "
        f"few-shot k = 16 per class for a binary task, on average; CB: 16, its 32 shipped rows split 16 train / 16 "
        f"dev by `{PLUGIN}`; BoolQ and COPA: their whole 32-row pools), dev subsets as in the column headings (the "
        f"first rows of each dev set). MeZO: {STEPS} steps x batch {BATCH} ({STEPS * BATCH // TRAIN} epochs), dev "
        f"metric every {EVAL_EVERY} steps, in bf16 (this CPU has bf16 arithmetic; eps 3e-3, which matched fp32 "
        "over four seeds, docs/half_precision.md); full-parameter rows at the project's defaults (lr 1e-5 for "
        "cross-entropy, 1e-4 for the metric's mean form), LoRA at the seed's lr 1e-4, eps 1e-2, prefix at lr 1e-3, "
        "eps 1e-1. The metric row optimizes the expected metric in mean form: the default log form over label "
        "words at T = 1 equals cross-entropy (docs/objectives.md), so it would repeat the cross-entropy row. "
        f"Backprop: AdamW for {EPOCHS} epochs in batches of {FT_BATCH} (the seed's OPT setting; lr 1e-5 full, 1e-4 "
        "LoRA) on the same cross-entropy, bf16 autocast over fp32 weights and optimizer states. In-context "
        f"learning: {SHOTS} demonstrations from the training examples (`zo-eval --shots {SHOTS}`). Linear probing: "
        "scikit-learn's LogisticRegression (standardized features) on the last layer's hidden state at the last "
        "prompt token (multiple choice: at the last token of prompt + candidate, the best-scoring candidate "
        "predicted). Peak RSS is each cell's process from the moment its model is loaded (`ru_maxrss` after "
        "resetting the high-water mark, as benchmarks/memory.py measures: model, states, activations), wall time under "
        "contention (several jobs on 2 cores: not a speed result; a MeZO cell resumed from a stopped attempt's "
        "checkpoint counts the resumed part only). A cell not run within the CPU budget says how long it would take: "
        "the tokens its forward passes read (from its task's examples: MeZO 2 x steps x batch training examples and "
        "the dev set at each curve point; backprop 3 x epochs x training examples, a backward pass counted as two "
        f"forwards; evaluations the dev set, with its demonstrations for in-context learning), each pass counted "
        f"{OVERHEAD} tokens more for its fixed cost, times the fastest pace (seconds per token) of the finished cells "
        "of its row (else of its family: MeZO, backprop, evaluation); contention makes most cells slower than "
        "that, and generation (SQuAD) decodes its answers on top: lower bounds. "
        "SQuAD: every row but linear probing applies (extractive QA has no classes or candidates to probe); its "
        "metric row optimizes expected F1 (mean form) over the greedy answer, generated once per step, and the gold "
        "answers. "
        f"Backprop / MeZO peak memory (full parameters): {ratios}. The slope "
        "column is the dev metric's change per 100 steps over the last quarter of each MeZO run, the next column "
        "its change since step 0: a slope near 0 is flat over the last quarter, a plateau only where the run had "
        "moved (a run still at its step-0 value, such as SST-2's LoRA and prefix rows, has not started to move at "
        "this budget); the curves: "
        + (", ".join(f"[{p.name}](benchmarks/results/{p.name})" for p in plots) or "none yet")
        + ". Each cell reruns with the command beside it (MeZO cells run `zo-tune` with the flags stored in "
        "`benchmarks/results/seed_table/<task>__<method>.json`). The seed's other tasks (WSC, WiC, MultiRC, ReCoRD, "
        "DROP, TREC) load from the hub only ([docs/tasks.md](docs/tasks.md)): no copy is on this machine and it has "
        "no network, so they have no cells. MeZO's rows to their plateau on a GPU (a separate GPU section): not run, "
        "no GPU was lent to these sessions; and the tool that lends one carries at most 64 MiB of files, less than "
        "this model's smallest copy (its 94 MiB Q4_1 GGUF), so that run needs a GPU machine that holds the model."
        + longer_notes(cells, longer))
    title = (f"{MODEL} (bf16) against the MeZO paper's baselines on the six shipped tasks, {TRAIN} training "
             f"examples per task, MeZO at {STEPS} steps: dev metric x 100, peak memory and wall time per cell.")
    result = publish("seed_table", "Seed comparison table", title, header, rows, "cpu", write, notes=notes,
                     params={"model": MODEL, "train": TRAIN, "steps": STEPS, "dev": DEV,
                             "longer": [{"task": t, "method": m, "steps": n, "value": 100 * c["value"],
                                         "best": best(c["curve"])}
                                        for (t, m, n), c in sorted(longer.items())]})
    if write:
        write_section("seed_table", readme_glance(result), README)
    return result


def best(points: list[list[float]]) -> float:
    """A curve's best dev metric, x 100."""
    return 100 * max(p[1] for p in points)


def longer_notes(cells: dict, longer: dict) -> str:
    """A sentence per longer run: where it ended against the cell's 100 steps, its slope, its command."""
    runs = [f"{t} {m} to step {c['last_step']}: {100 * c['value']:.1f} (at step {STEPS}: "
            f"{100 * cells[(t, m)]['value']:.1f}; best {best(c['curve']):.1f}; slope over its "
            f"last quarter {slope(c['curve']):+.1f} per 100 steps; {c['wall_s'] / 60:.0f} min for steps "
            f"{c['resumed_at_step'] + 1}-{c['last_step']}; "
            f"`{c['command']}`)" for (t, m, _), c in sorted(longer.items()) if (t, m) in cells]
    return ("" if not runs else " Longer MeZO runs (a cell run for more steps with the same seeds and lr: its "
            "finished run continued, or run again from step 0; dashed on the task's plot): " + "; ".join(runs) + ".")


def readme_glance(result: dict) -> str:
    """README's at-a-glance block: the grid with a caption linking to the full table."""
    longer = "; ".join(f"{r['task']} {r['method']} {r['value']:.1f} at step {r['steps']} (best {r['best']:.1f})"
                       for r in result["params"].get("longer", []))
    return ("[Seed comparison](BENCHMARKS.md#seed-comparison-table): dev metric x 100 (-: no result, the full table "
            "says why); "
            f"peak RSS, backprop / MeZO: {memory_ratios(result)}; "
            + (f"run on for more steps: {longer}; " if longer else "")
            + "what it shows at this budget: [docs/seed_comparison.md](docs/seed_comparison.md).\n\n" + glance(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", help="run one cell, TASK/METHOD, e.g. sst2/mezo-ce")
    parser.add_argument("--workers", type=int, default=2, help="cells run at once (at most 2 here)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--cells", help="comma-separated TASK/METHOD cells to run, in this order (default: every "
                        "missing cell of --tasks, cheapest first)")
    parser.add_argument("--table", action="store_true", help="only write the table from the finished cells")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md and benchmarks/results/")
    parser.add_argument("--steps", type=int, help=f"with --cell, a MeZO cell: run it on to this many steps (more "
                        f"than the table's {STEPS}), continuing its finished run")
    args = parser.parse_args(argv)
    names = [c for c in (args.cell or args.cells or "").split(",") if c]
    cells = [(name.partition("/")[0], name.partition("/")[2]) for name in names]
    for name, (task, method) in zip(names, cells):
        if task not in TASKS or method not in METHODS:
            parser.error(f"unknown cell {name!r}; tasks: {', '.join(TASKS)}; methods: {', '.join(METHODS)}")
    if args.steps is not None and not (args.cell and cells[0][1] in MEZO and args.steps > STEPS):
        parser.error(f"--steps goes with --cell TASK/METHOD, a MeZO method ({', '.join(MEZO)}), and more than the "
                     f"table's {STEPS} steps; got --steps {args.steps}" + ("" if args.cell else " without --cell"))
    if args.cell:
        print(json.dumps(run_cell(*cells[0], args.steps)))
        return
    tasks = args.tasks.split(",")
    if unknown := [t for t in tasks if t not in TASKS]:
        parser.error(f"unknown task {unknown[0]!r}; accepted: {', '.join(TASKS)}")
    if not args.table:
        drive(max(1, min(args.workers, 2)), cells or [c for c in queue() if c[0] in tasks])
    table(args.write)


if __name__ == "__main__":
    main()
