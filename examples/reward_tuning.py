"""Tune SmolLM2-135M toward non-differentiable rewards: short answers that match the reference.

Two TRL-style reward functions (``reward(prompts, completions, **columns) -> list[float]``) are combined with
weights: a short answer and token F1 against the reference answers, read from the batch's ``answers`` column.
``--short length`` (default) rewards at most ``MAX_WORDS`` words, a rule no loss function expresses; ``--short
span`` asks for 1 to ``MAX_WORDS`` words copied from the passage (the ``context`` column), which non-answers
such as "The answer is:" do not meet. The chat model answers SQuAD questions in long sentences; the rewards
ask for the answer alone.

Each step samples ``--candidates`` completions per prompt (seeded by the prompts), rewards them once, and
optimizes the expected reward when a completion is drawn from the model's own likelihoods over them
(``RewardObjective(candidates=k)``); ``--candidates 0`` optimizes the reward of a single sampled completion
instead. Both rewards are reported before and after tuning on held-out prompts, with greedy decoding. Updates
are normalized (``MeZO(update="normalized")``): a reward in [0, 1.5] has projected gradients ~20x smaller than
SQuAD's cross-entropy, and normalizing makes the step length the lr's, whatever the reward's scale.

    python examples/reward_tuning.py --steps 60
"""

from __future__ import annotations

import argparse

from metrics import squad_f1
from metrics.squad import normalize_answer
from tasks import get_task
from zo_objectives import GenerationPredictor, MeZO, RewardObjective, load_model, train
from zo_objectives.optimizer import UPDATES

MAX_WORDS = 6
INSTRUCTION = "Answer with the shortest possible phrase from the text.\n\n"


def short_answer(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1 when the completion has at most MAX_WORDS words (and is not empty), else 0.

    >>> short_answer([], ["Paris", "", "one two three four five six seven"])
    [1.0, 0.0, 0.0]
    """
    return [float(0 < len(text.split()) <= MAX_WORDS) for text in completions]


def short_span(prompts: list[str], completions: list[str], context: list[str], **columns) -> list[float]:
    """1 when the completion, normalized as SQuAD does, is 1 to MAX_WORDS whole words of the passage, else 0.

    >>> passage = "The Eiffel Tower, in Paris, opened in 1889."
    >>> short_span([], ["the Eiffel Tower.", "Pari", "The answer is:"], context=[passage] * 3)
    [1.0, 0.0, 0.0]
    """
    rewards = []
    for text, passage in zip(completions, context):
        words = normalize_answer(text)
        rewards.append(float(0 < len(words.split()) <= MAX_WORDS and f" {words} " in f" {normalize_answer(passage)} "))
    return rewards


def answer_f1(prompts: list[str], completions: list[str], answers: list[list[str]], **columns) -> list[float]:
    """SQuAD token F1 of each completion against its reference answers (a column of the batch).

    >>> answer_f1([], ["the Eiffel Tower", "Paris, France"], answers=[["Eiffel Tower"], ["Paris"]])
    [1.0, 0.6666666666666666]
    """
    return [squad_f1([text], [golds]) for text, golds in zip(completions, answers)]


SHORT_REWARDS = {"length": short_answer, "span": short_span}


def prompts_from_squad(tokenizer, n: int, offset: int) -> list[dict]:
    """Chat-formatted prompts built from SQuAD training questions (shipped with the project)."""
    rows = get_task("squad").examples("train", n=offset + n, seed=0)[offset:]
    messages = [[{"role": "user", "content": f"{INSTRUCTION}{r['raw']['context']}\n\nQuestion: {r['raw']['question']}"}]
                for r in rows]
    return [{"prompt": tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
             "answers": r["answers"], "context": r["raw"]["context"]} for m, r in zip(messages, rows)]


def mean_rewards(objective: RewardObjective, model, examples: list[dict], batch_size: int = 16) -> list[float]:
    """Each reward function's mean over ``examples`` (one generation per example)."""
    totals = [0.0] * len(objective.rewards)
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        objective.rewards_for(model, batch)
        for k, mean in enumerate(objective.last_means.values()):  # one per reward function, in order
            totals[k] += mean * len(batch)
    return [t / len(examples) for t in totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--update", choices=UPDATES, default="normalized",
                        help="normalized (default): each step moves ~lr * z; the expected reward's projected "
                             "gradients are ~0.75 (median), so sgd at cross-entropy's lr moves ~20x less")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--short", choices=SHORT_REWARDS, default="length",
                        help="the short-answer reward: length = at most MAX_WORDS words; span = 1 to MAX_WORDS words "
                             "of the passage")
    parser.add_argument("--short-weight", type=float, default=0.5,
                        help="weight of the short-answer reward (F1's is 1); 0 optimizes F1 alone, both are reported")
    parser.add_argument("--candidates", type=int, default=4, help="sampled completions per prompt (0: one)")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    train_set = prompts_from_squad(tokenizer, 400, offset=0)
    held_out = prompts_from_squad(tokenizer, args.held_out, offset=400)
    rewards = [SHORT_REWARDS[args.short], answer_f1]
    sampler = GenerationPredictor(tokenizer, max_new_tokens=args.max_new_tokens, stop=["\n"], temperature=0.7)
    greedy = GenerationPredictor(tokenizer, max_new_tokens=args.max_new_tokens, stop=["\n"])
    objective = RewardObjective(sampler, rewards, weights=[args.short_weight, 1.0], candidates=args.candidates)
    report = RewardObjective(greedy, rewards)
    before = mean_rewards(report, model, held_out)
    optimizer = MeZO(model.parameters(), lr=args.lr, eps=args.eps, seed=0, update=args.update)
    train(model, optimizer, objective, train_set, steps=args.steps, batch_size=args.batch_size)
    after = mean_rewards(report, model, held_out)
    for fn, b, a in zip(rewards, before, after):
        print(f"held-out {fn.__name__} (greedy, {len(held_out)} prompts): {b:.3f} -> {a:.3f} after {args.steps} steps")


if __name__ == "__main__":
    main()
