"""Quality and wall time of the same zo-tune run in several dtypes: dev metric before and after, time per step.

Reads finished run folders (the same settings and seeds, only ``--dtype`` and ``--eps`` differing; eps is named
where it is not 1e-3), made for example by

    zo-tune --dtype fp32 --output-dir runs/quality_fp32     # the `make run` protocol: SST-2, accuracy, 400 steps
    zo-tune --dtype bf16 --output-dir runs/quality_bf16

and tabulates them:

    python benchmarks/half_precision.py --runs runs/quality_fp32 runs/quality_bf16 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish  # noqa: E402


def summary(run: Path) -> list:
    config = json.loads((run / "config.json").read_text())
    result = json.loads((run / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step = statistics.median(r["seconds"] for r in rows)
    setting = config["dtype"] + ("" if config["eps"] == 1e-3 else f", eps {config['eps']:g}")
    return [setting, config["seed"], f"{100 * result['before']:.2f}", f"{100 * result['after']:.2f}", len(rows),
            f"{step:.2f}", f"{result['train_seconds'] / 60:.1f}"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="finished zo-tune run folders")
    parser.add_argument("--note", default="", help="how the runs were made (the command, threads, machine load)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    rows = [summary(Path(run)) for run in args.runs]
    settings = list(dict.fromkeys(row[0] for row in rows))
    after = {(row[0], row[1]): float(row[3]) for row in rows}
    groups = {name: [v for (s, _), v in after.items() if s == name] for name in settings}
    for name in settings[1:]:  # paired by seed with the first setting: the difference the setting makes
        groups[f"{name} - {settings[0]}"] = [v - after[settings[0], seed] for (s, seed), v in after.items()
                                             if s == name and (settings[0], seed) in after]
    for name, values in groups.items():  # mean and sd over seeds
        if len(values) > 1:
            rows.append([name, "mean", "", f"{statistics.mean(values):.2f}", "", "", ""])
            rows.append([name, "sd", "", f"{statistics.stdev(values):.2f}", "", "", ""])
    config = json.loads((Path(args.runs[0]) / "config.json").read_text())
    return publish("half_precision", "Half precision: the same run in each dtype",
                   f"zo-tune on {config['task']} ({config['objective']} objective, {config['steps']} steps x "
                   f"{config['batch_size']}, {config['model']}), run folders "
                   f"{', '.join(args.runs)}; dev metric x 100.",
                   ["setting", "seed", "dev before", "dev after", "steps", "median s per step", "train minutes"],
                   rows,
                   "cpu", args.write, notes=args.note, params={"task": config["task"], "runs": args.runs})


if __name__ == "__main__":
    main()
