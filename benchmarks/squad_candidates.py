"""How the zero-shot greedy SQuAD answer compares with the gold one, and how the F1 objective's two candidates
(greedy, gold) rank by total and by per-token log-likelihood, over the first ``--n`` training questions.

    python benchmarks/squad_candidates.py --n 96 --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish  # noqa: E402


def main(argv: list[str] | None = None) -> list[list]:
    from metrics import squad_f1
    from tasks import get_task
    from zo_objectives import load_model
    from zo_objectives.scoring import GenerationPredictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--write", action="store_true", help="update the squad_candidates section of BENCHMARKS.md")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    gen = GenerationPredictor(tokenizer, max_new_tokens=16)
    examples = get_task("squad").examples("train", n=args.n, seed=0)
    f1s, inside, first, wins = [], [], [], {False: [], True: []}
    for i in range(0, len(examples), 8):
        batch = examples[i:i + 8]
        prompts = [ex["prompt"] for ex in batch]
        raw = gen.generate(model, prompts, strip=False)  # scored as generated, the gold with its leading space
        greedy = [t.strip() for t in raw]
        for text, ex in zip(greedy, batch):
            gold = ex["answers"][0]
            f1s.append(squad_f1([text], [ex["answers"]]))
            inside.append(gold.lower() in text.lower())
            tokens = tokenizer.encode(" " + text, add_special_tokens=False)
            first.append(bool(tokens) and tokens[0] == tokenizer.encode(" " + gold, add_special_tokens=False)[0])
        pairs = [(p, [r, ex["targets"][0]]) for p, r, g, ex in zip(prompts, raw, greedy, batch)
                 if g and g != ex["answers"][0]]
        for normalize in wins:
            if pairs:
                scores = gen.candidate_scores(model, [p for p, _ in pairs], [c for _, c in pairs], normalize)
                wins[normalize] += (scores[:, 1] > scores[:, 0]).tolist()

    def share(values: list) -> str:
        return f"{sum(values) / len(values):.2f}" if values else "-"

    rows = [["mean F1 of the greedy answer", f"{sum(f1s) / len(f1s):.3f}", len(f1s)],
            ["gold answer inside the greedy answer", share(inside), len(inside)],
            ["same first token", share(first), len(first)],
            ["gold beats greedy by total log-likelihood", share(wins[False]), len(wins[False])],
            ["gold beats greedy by mean log-likelihood per token", share(wins[True]), len(wins[True])]]
    header = ["zero-shot, SQuAD training questions", "value", "questions"]
    title = f"{args.model}, greedy answers of up to 16 tokens; the last two rows count questions where they differ."
    publish("squad_candidates", "SQuAD candidates (zero-shot)", title, header, rows, "cpu", args.write,
            params={"model": args.model, "n": args.n})
    return rows


if __name__ == "__main__":
    main()
