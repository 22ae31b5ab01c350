"""Tune SmolLM2-135M on a reward that only a checker gives: one-digit arithmetic, the answer alone.

The ``arith`` task has no gold completion: ``metrics.rewards.answer_check`` gives 1 for a completion that is just
the right integer, 0.1 for a wrong integer alone and 0 for anything else (the untuned model often writes the
equation, "5 - 9 = 1"). A reward is a plain function in TRL's signature, ``reward(prompts, completions,
**columns) -> list[float]``; the task's other fields (here ``answer``) arrive as columns. ``--reward NAME`` takes
any ready one (``metrics.rewards``: exact_answer, number_close, token_f1, format_match, length_limit,
answer_check), repeatable; ``--task squad --reward token_f1`` tunes SQuAD answers on their F1.

Three forms (``--form``): ``population`` (the default: tied with ``es`` in reward within the seeds' spread, and the
cheapest per CPU second, BENCHMARKS.md "Reward comparison (arith)"), where 8 perturbed models each decode their own
greedy completions in one batched ``generate`` and are scored by the reward (an evolution-strategy estimate);
``es``, MeZO's antithetic pair doing the same, one perturbed model at a time; and ``expected``, the expected reward
over ``--candidates`` sampled completions per prompt, drawn from the model's own likelihoods over them (one reward
call per candidate, a smooth function of the weights). Updates are normalized (``update="normalized"``): the lr is
the step length, whatever the reward's scale. eps is 1e-2: at 1e-3 most perturbations left every greedy token
unchanged (a tie, no signal). The held-out figures are the rewards of greedy completions on the task's dev prompts,
before and after; the defaults are the comparison's chosen setting and budget (384 scored completions).

    python examples/reward_tuning.py                      # arith, a population of 8
    python examples/reward_tuning.py --form es --steps 24 --batch-size 8
"""

from __future__ import annotations

import argparse

from metrics.rewards import get_reward, length_limit, list_rewards, token_f1
from tasks import get_task
from zo_objectives import GenerationPredictor, MeZO, Population, RewardObjective, load_model, train

FORMS = ("population", "es", "expected")
MAX_WORDS = 6
answer_f1 = token_f1  # SQuAD token F1 against the "answers" column (the name README's commands use)


def short_answer(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Your own reward in TRL's signature: here a ready one with a fixed setting, 1 to MAX_WORDS words.

    >>> short_answer([], ["Paris", "", "one two three four five six seven"])
    [1.0, 0.0, 0.0]
    """
    return length_limit(prompts, completions, max_words=[MAX_WORDS] * len(completions))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arith", help="a generation task (arith, squad)")
    p.add_argument("--reward", action="append", choices=list_rewards(), help="default: the task's own")
    p.add_argument("--weights", type=float, nargs="*", help="one per --reward (default 1 each)")
    p.add_argument("--form", default="population", choices=FORMS)
    p.add_argument("--population", type=int, default=8, help="--form population: perturbed models per step")
    p.add_argument("--candidates", type=int, default=4, help="--form expected: sampled completions per prompt")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=2, help="prompts per step (each member decodes them all)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--held-out", type=int, default=64, help="dev prompts the rewards are reported on")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    args = parse(argv)
    task = get_task(args.task)
    names = args.reward or [task.reward or "token_f1"]
    model, tokenizer = load_model(args.model)
    tokens = args.max_new_tokens or task.max_new_tokens
    greedy = GenerationPredictor(tokenizer, max_new_tokens=tokens)
    rewards = [get_reward(name) for name in names]
    if args.form in ("es", "population"):  # each perturbed model's own greedy completions
        objective = RewardObjective(greedy, rewards, args.weights)
    else:
        sampler = GenerationPredictor(tokenizer, max_new_tokens=tokens, temperature=1.0, sample_seed=args.seed)
        objective = RewardObjective(sampler, rewards, args.weights, candidates=args.candidates)
    held_out = task.examples("dev", n=args.held_out)
    before, before_means = objective.evaluate(model, held_out, greedy, args.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.form == "population":
        optimizer = Population(params, lr=args.lr, eps=args.eps, seed=args.seed, update="normalized",
                               population=args.population)
    else:
        optimizer = MeZO(params, lr=args.lr, eps=args.eps, seed=args.seed, update="normalized")
    train(model, optimizer, objective, task.examples("train", seed=args.seed), steps=args.steps,
          batch_size=args.batch_size, seed=args.seed, progress=False)
    after, after_means = objective.evaluate(model, held_out, greedy, args.batch_size)
    results = {name: (before_means[name], after_means[name]) for name in before_means}
    results["weighted"] = (before, after)
    for name, (b, a) in results.items():
        print(f"held-out {name}: {b:.4f} -> {a:.4f} after {args.steps} steps")
    return results


if __name__ == "__main__":
    main()
