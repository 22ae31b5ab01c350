"""README's results table, generated from the stored results (benchmarks/results/*.json).

Each row names the result file, the table row and the column its number comes from, so that README shows
the numbers exactly as BENCHMARKS.md does and `tests/test_docs.py` fails when the two drift apart.

    python benchmarks/summary.py            # print the table
    python benchmarks/summary.py --write    # replace the results section of README.md
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, load_results, markdown_table, write_section  # noqa: E402

README = ROOT / "README.md"



POPULATION = ("population of 8 (rank 1; 2 prompts per step), evolution-strategy form (all members decode greedily in "
              "one batched generate)")
GRZO_AMD = ("GRZO, evolution-strategy form (8 prompts per step, each its own antithetic pair of members of rank 1, all "
            "decoding greedily in one batched generate; the step divided by the spread of the pairs' differences)")
FZOO_AMD = ("FZOO, evolution-strategy form (8 one-sided members, 2 prompts per step, and the unperturbed model decode "
            "greedily in one batched generate; the step divided by the rewards' spread)")
CHOSEN = "lr 0.001, eps 0.01 (4 of 4 grid points ran)"  # pick: its chosen setting's row, not the eps 1e-3 study

# (what, method, [(section, {column: value} picking the row, column of the number)])
ROWS: list[tuple[str, str, list[tuple[str, dict[str, str], str]]]] = [
    # the default accuracy objective (log form) IS cross-entropy on label words (objective_identity): one row
    ("SST-2, 400 steps x 16, seed 0", "MeZO on cross-entropy (= accuracy in log form, the default) / on expected "
     "accuracy (mean form) / on hard accuracy",
     [("objective_gap_sst2", {"objective": "cross_entropy"}, "seed 0"),
      ("objective_gap_sst2", {"objective": "accuracy_mean"}, "seed 0"),
      ("objective_gap_sst2", {"objective": "accuracy_hard"}, "seed 0")]),
    ("SST-2, the `make run` protocol, mean (sd) over seeds", "MeZO on accuracy (log form: cross-entropy) in fp32 / "
     "bf16 at eps 1e-3 / bf16 at "
     "eps 3e-3 (its default)",
     [("half_precision", {"setting": setting, "seed": stat}, "dev after")
      for setting in ("fp32", "bf16", "bf16, eps 0.003") for stat in ("mean", "sd")]),
    ("`make run` on a 2-core CPU, `--dtype auto`: bf16 on an Intel Xeon with AVX512-BF16 / fp32 on an AMD EPYC "
     "without AVX512", "wall minutes in all, bf16 / fp32; dev accuracy after, bf16 / fp32",
     [("make_run", {"dtype used": dtype}, column) for column in ("wall minutes, all of make run", "dev accuracy after")
      for dtype in ("bf16", "fp32")]),
    ("SQuAD F1, dev 0-499, 60 steps x 8, 3 seeds", "MeZO on cross-entropy (lr 4e-5) / on F1 (lr 1e-5)",
     [("objective_gap_squad", {"objective": name}, stat) for name in ("cross_entropy_4x", "squad_f1")
      for stat in ("mean", "sd")]),
    ("SQuAD, the same weights, held-out dev 500-999", "F1 minus cross-entropy",
     [("heldout_gap_squad", {"seed": "mean"}, "gap#2")]),
    ("Step time, SmolLM2-135M, 16 x 64 tokens, CPU, fp32 / bf16", "MeZO, in forward-pass pairs",
     [("step_speed", {"configuration": "MeZO table (default)"}, "step / (2 x forward)"),
      ("step_speed_bf16", {"configuration": "MeZO table (default)"}, "step / (2 x forward)")]),
    ("Step time, 1.1B Llama shape, 16 x 64 tokens, bf16, H100", "MeZO / reference MeZO, in forward-pass pairs",
     [("step_speed_random-1.1b_bf16_cuda", {"noise chunks": "GPU default (2^24)",
                                            "configuration": "MeZO table (default)"}, "step / (2 x forward)"),
      ("step_speed_random-1.1b_bf16_cuda", {"noise chunks": "GPU default (2^24)",
                                            "configuration": "reference MeZO"}, "step / (2 x forward)")]),
    ("Peak memory / inference's, SmolLM2-135M, fp32, 16 x 64", "MeZO / FZOO (4 members x 4 rows) / reference MeZO / "
     "backprop + AdamW",
     [("memory", {"config": "mezo"}, "peak / inference peak"),
      ("memory", {"config": "fzoo"}, "peak / inference peak"),
      ("memory", {"config": "reference"}, "peak / inference peak"),
      ("memory", {"config": "adamw"}, "peak / inference peak")]),
    ("Peak memory / inference's, 1.1B Llama shape, bf16, 2 x 32", "MeZO / backprop + LoRA / backprop + AdamW",
     [("memory_random-1.1b_bf16", {"config": "mezo"}, "peak / inference peak"),
      ("memory_random-1.1b_bf16", {"config": "lora"}, "peak / inference peak"),
      ("memory_random-1.1b_bf16", {"config": "adamw"}, "peak / inference peak")]),
    ("Arithmetic checker reward (no gold answer), 64 held-out prompts, 3 seeds: 384 scored completions each; "
     "population also at GRPO's CPU time", "untuned / population of 8, ES form / the same at GRPO's time / TRL GRPO / "
     "best of 16 (oracle)",
     [("reward_comparison_arith", {"method": method, **({"setting (chosen on training prompts)": CHOSEN} if pick
                                                        else {})}, "held-out reward after (greedy)")
      for method, pick in (("untuned, greedy", False), (POPULATION, True),
                           (POPULATION + ", at GRPO's tuning CPU time", True), ("TRL GRPOTrainer", False),
                           ("best of 16 samples (oracle: picked by the reward)", False))]),
    ("SQuAD token-F1 reward, 64 held-out prompts, 3 seeds: 384 scored completions each (cross-entropy: none "
     "scored); population also at GRPO's CPU time",
     "untuned / MeZO, ES form / population of 8, ES form / the same at GRPO's time / MeZO on cross-entropy (gold "
     "answers) / TRL GRPO / best of 16 (oracle)",
     [("reward_comparison_squad", {"method": method}, "held-out reward after (greedy)") for method in (
         "untuned, greedy", "MeZO, evolution-strategy form (each perturbed model decodes greedily)", POPULATION,
         POPULATION + ", at GRPO's tuning CPU time", "MeZO, cross-entropy on the gold answers", "TRL GRPOTrainer",
         "best of 16 samples (oracle: picked by the reward)")]),
    ("SST-2, `make run` protocol, fp32, AMD EPYC: dev accuracy at MeZO's 400-step CPU time, seeds 0-2 "
     "(backprop: 0)", "MeZO / FZOO (N 8) / population 4 x 8 / GRZO / backprop + AdamW",
     [("estimators", {"row": "mezo"}, "dev accuracy at its last step"),
      *[("estimators", {"row": row}, "dev accuracy at MeZO's CPU time")
        for row in ("fzoo-lr2e-6", "population", "grzo", "backprop")]]),
    ("Arithmetic reward, AMD EPYC, at GRPO's tuning CPU time, 3 seeds",
     "population of 8 / GRZO (8 prompts, a pair each) / FZOO (N 8) / TRL GRPO",
     [("reward_comparison_arith-amd", {"method": method + (", at GRPO's tuning CPU time" if timed else "")},
       "held-out reward after (greedy)") for method, timed in (
         (POPULATION, True), (GRZO_AMD, True), (FZOO_AMD, True), ("TRL GRPOTrainer", False))]),
    ("32.5B Llama shape, bf16, 16 x 256 tokens, one H100 80 GB", "MeZO: peak GiB / x inference's",
     [("large_model_cuda", {}, "MeZO peak GiB"), ("large_model_cuda", {}, "MeZO / inference")]),
]


def cell(results: dict[str, dict], section: str, where: dict[str, str], column: str) -> str:
    """The cell of ``column`` (``name#2``: its second column of that name) in the row matching ``where``."""
    result = results[section]
    name, _, nth = column.partition("#")
    index = [i for i, c in enumerate(result["columns"]) if c == name][int(nth or 1) - 1]
    rows = [r for r in result["rows"] if all(r[result["columns"].index(k)] == v for k, v in where.items())]
    if len(rows) != 1:
        raise ValueError(f"{section}: {len(rows)} rows match {where}, expected one")
    return rows[0][index]


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def joined(values: list[str], sd: bool) -> str:
    """Cells as README shows them: ``a / b``, or ``mean (sd x)`` pairs for mean and sd cells."""
    if sd:
        values = [f"{m} (sd {s})" for m, s in zip(values[::2], values[1::2])]
    return " / ".join(values)


def table(results: dict[str, dict] | None = None) -> str:
    results = load_results() if results is None else results
    rows = []
    for what, method, cells in ROWS:
        values = [cell(results, *spec) for spec in cells]
        sections = list(dict.fromkeys(section for section, _, _ in cells))
        links = ", ".join(f"[{results[s]['heading']}](BENCHMARKS.md#{anchor(results[s]['heading'])})" for s in sections)
        sd = any(c == "sd" or where.get("seed") == "sd" for _, where, c in cells)
        rows.append([what, method, joined(values, sd=sd), links])
    return markdown_table(["measurement", "method", "result", "details"], rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the results section of README.md")
    args = parser.parse_args(argv)
    text = table()
    print(text)
    if args.write:
        write_section("results", text, README)
    return text


if __name__ == "__main__":
    main()
