"""Time `make run` (zo-tune on SST-2, 400 steps, the shipped SmolLM2-135M) as a new user runs it.

It runs the command `make run` runs (README's quickstart) in a fresh run folder, once per ``--dtype``, and
records its wall time in all (model load, evaluation before and after, tuning), the tuning time zo-tune
reports, the dev accuracy before and after, the dtype ``auto`` picked and the CPU. A timing is worth something
only on a quiet machine: the load average before and after each run is recorded beside it.

    python benchmarks/make_run.py --write                  # --dtype auto: bf16 where the CPU has bf16 arithmetic
    python benchmarks/make_run.py --dtype auto fp32 --write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, publish  # noqa: E402

COMMAND = ["-m", "zo_objectives.cli", "--task", "sst2", "--objective", "accuracy", "--steps", "400", "--overwrite",
           "--no-progress"]  # make run: zo-tune's defaults on SST-2 (Makefile), without the progress bars


def run(dtype: str, output: Path) -> list[str]:
    """One run of make run's command in ``dtype``: a table row."""
    folder = output / f"make_run_{dtype}"
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, *COMMAND, "--dtype", dtype, "--output-dir", str(folder)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"zo-tune --dtype {dtype} failed:\n{done.stderr[-2000:]}")
    config = json.loads((folder / "config.json").read_text())
    evals = json.loads((folder / "eval.json").read_text())
    hardware = config.get("hardware", {})
    return [dtype, config["dtype"], hardware.get("name", "-"), f"{wall / 60:.1f}", f"{evals['train_seconds'] / 60:.1f}",
            f"{evals['before']:.4f}", f"{evals['after']:.4f}", f"{load_before:.2f}", f"{os.getloadavg()[0]:.2f}",
            time.strftime("%Y-%m-%d")]


def kept_rows(header: list[str], new: list[list[str]]) -> list[list[str]]:
    """The stored rows of another dtype used (measured on another CPU: bf16 needs AVX512-BF16 to be worth
    timing), so that one machine's run does not erase another's; rows stored before the date column get the
    date of their result."""
    path = RESULTS / "make_run.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    used = {row[1] for row in new}
    rows = []
    for row in old["rows"]:
        row = dict(zip(old["columns"], row))
        row.setdefault("measured on", old["environment"]["date"][:10])
        if row["dtype used"] not in used:
            rows.append([row[c] for c in header])
    return rows


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["auto"], help="zo-tune --dtype values, one run each")
    parser.add_argument("--output", default="runs/make_run_timed", help="where the run folders go")
    parser.add_argument("--write", action="store_true", help="store the result and its BENCHMARKS.md section")
    args = parser.parse_args(argv)
    table = [run(dtype, ROOT / args.output) for dtype in args.dtype]
    header = ["--dtype", "dtype used", "CPU", "wall minutes, all of make run", "tuning minutes", "dev accuracy before",
              "dev accuracy after", "load average before", "load average after", "measured on"]
    table = kept_rows(header, table) + table
    title = ("make run's command (zo-tune --task sst2 --objective accuracy --steps 400: SmolLM2-135M-Instruct, "
             "all 872 dev sentences, batch 16, the default threads), once per dtype, model already cached.")
    notes = ("Wall minutes include loading the model and both evaluations; tuning minutes are zo-tune's own count "
             "(eval.json's train_seconds). A load average above about 0.5 before a run means another process "
             "shared the CPU. Each row keeps the date it was measured on: a run replaces only the rows of the dtype it "
             "used, so the bf16 row (a CPU with AVX512-BF16) and the fp32 row (a CPU without AVX512) sit side by "
             "side; the environment below is the latest run's.")
    publish("make_run", "make run, timed", title, header, table, "cpu", args.write, notes=notes,
            params={"dtypes": args.dtype})
    return table


if __name__ == "__main__":
    main()
