"""Build tasks/data/arith: every one-digit sum and difference (a + b, a - b for a, b in 1..9: 162 problems),
shuffled by ``random.Random(0)`` and split into 98 training and 64 held-out problems (no problem in both).

    python tasks/data/arith/make_arith.py

Each row: ``question`` ("7 - 9") and ``answer`` (the integer, as text: what the checker compares; there is no
gold completion). Measured on SmolLM2-135M-Instruct, greedy, prompt "Question: What is 7 - 9?\\nAnswer:", the
answer alone scores 0.28 under ``metrics.rewards.answer_check`` (BENCHMARKS.md, reward comparison).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = 98


def problems() -> list[dict]:
    rows = [{"question": f"{a} {op} {b}", "answer": str(a + b if op == "+" else a - b)}
            for a in range(1, 10) for b in range(1, 10) for op in "+-"]
    random.Random(0).shuffle(rows)
    return rows


def main() -> None:
    rows = problems()
    for name, part in (("train.jsonl", rows[:TRAIN]), ("dev.jsonl", rows[TRAIN:])):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
