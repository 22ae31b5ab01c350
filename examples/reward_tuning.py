"""Tune SmolLM2-135M toward a non-differentiable reward: answers that parse as JSON with an "answer" key.

Two TRL-style reward functions (``reward(prompts, completions, **columns) -> list[float]``) are combined with
weights; sampling is seeded by the prompts, so both sides of each SPSA estimate compare the same draws.
The reward is reported before and after tuning on held-out prompts, with greedy decoding.

    python examples/reward_tuning.py --steps 60
"""

from __future__ import annotations

import argparse
import json

from tasks import get_task
from zo_objectives import Generation, MeZO, RewardObjective, load_model, train

INSTRUCTION = 'Reply only with JSON of the form {"answer": "..."}. Question: '


def json_answer(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1 when the completion is a JSON object with a string "answer", else 0."""
    out = []
    for text in completions:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            out.append(0.0)
            continue
        out.append(float(isinstance(value, dict) and isinstance(value.get("answer"), str)))
    return out


def starts_with_brace(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1 when the completion starts with "{": a denser hint toward the same goal."""
    return [float(text.lstrip().startswith("{")) for text in completions]


def prompts_from_squad(tokenizer, n: int, offset: int) -> list[dict]:
    """Chat-formatted prompts built from SQuAD training questions (shipped with the project)."""
    rows = get_task("squad").examples("train", n=offset + n, seed=0)[offset:]
    return [{"prompt": tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTION + r["raw"]["question"]}],
                                                      tokenize=False, add_generation_prompt=True),
             "question": r["raw"]["question"]} for r in rows]


def mean_reward(objective: RewardObjective, model, examples: list[dict], batch_size: int = 16) -> float:
    rewards = [r for i in range(0, len(examples), batch_size)
               for r in objective.rewards_for(model, examples[i:i + batch_size])]
    return sum(rewards) / len(rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--held-out", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    train_set = prompts_from_squad(tokenizer, 400, offset=0)
    held_out = prompts_from_squad(tokenizer, args.held_out, offset=400)
    rewards = [json_answer, starts_with_brace]
    sampler = Generation(tokenizer, max_new_tokens=args.max_new_tokens, stop=[], temperature=0.7)
    greedy = Generation(tokenizer, max_new_tokens=args.max_new_tokens, stop=[])
    objective = RewardObjective(sampler, rewards, weights=[1.0, 0.5])
    report = RewardObjective(greedy, [json_answer])
    before = mean_reward(report, model, held_out)
    optimizer = MeZO(model.parameters(), lr=args.lr, eps=args.eps, seed=0)
    train(model, optimizer, objective, train_set, steps=args.steps, batch_size=args.batch_size)
    after = mean_reward(report, model, held_out)
    print(f"held-out JSON-answer reward (greedy, {len(held_out)} prompts): {before:.3f} -> {after:.3f} "
          f"after {args.steps} steps")


if __name__ == "__main__":
    main()
