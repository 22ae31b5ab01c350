"""``curve.png`` for a run folder: the training objective (and each reward's mean), the dev metric and the tie rate
against steps."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rolling_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: Path, window: int = 25) -> Path:
    """Draw ``run_dir/curve.png`` from ``metrics.jsonl`` and ``config.json``; return its path."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    config = json.loads((run_dir / "config.json").read_text())
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    name = config["objective"]  # its own value where logged (expected accuracy, ...), else the loss minimized
    # "train/<name>" since issue 34 (the batch's expected value, never the evaluation's), the bare name before
    key = next((k for k in (f"train/{name}", name) if rows and all(k in r for r in rows)), "loss")
    axes[0].plot(steps, [r[key] for r in rows], alpha=0.3, lw=0.8)
    axes[0].plot(steps, rolling_mean([r[key] for r in rows], window), lw=1.5)
    t = config.get("smoothing", config.get("temperature"))  # (config.json before the rename: "temperature")
    form = f" (optimized in {config['form']} form)" if config.get("form") else ""
    title = (f"train/{name} (expected at T = {t:g}, batch){form}" if t and key != "loss"
             else f"train/{name} (batch)" if key != "loss" else f"training loss ({name})")
    rewards = list(dict.fromkeys(k for r in rows for k in r.get("rewards", {})))  # reward runs: each reward's mean
    for reward in rewards:
        axes[0].plot(steps, rolling_mean([r.get("rewards", {}).get(reward, float("nan")) for r in rows], window),
                     lw=1.2, ls="--", label=f"{reward} (batch mean)")
    if rewards:
        axes[0].legend(fontsize=7)
    axes[0].set(title=title, xlabel="step")
    evals = [(r["step"], r["eval"]) for r in rows if "eval" in r]
    before = json.loads((run_dir / "eval.json").read_text()).get("before") if (run_dir / "eval.json").exists() else None
    if before is not None:
        evals = [(0, before), *evals]
    if evals:
        axes[1].plot(*zip(*evals), marker="o")
    split = "held-out" if config.get("heldout_fraction") else "dev"
    axes[1].set(title=f"eval/{config['metric']} ({split}, {config['eval_examples']} examples)", xlabel="step")
    axes[2].plot(steps, rolling_mean([float(r["tied"]) for r in rows], window))
    axes[2].set(title=f"steps whose two losses tie ({window}-step mean)", xlabel="step", ylim=(-0.02, 1.02))
    fig.suptitle(f"{config['model']} on {config['task']}")
    fig.tight_layout()
    path = run_dir / "curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
