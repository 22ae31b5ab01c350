"""Ready reward functions in TRL's signature ``reward(prompts, completions, **columns) -> list[float]``.

Each reads what it compares against from the batch's columns, as TRL's ``GRPOTrainer`` passes a data set's
other columns: ``answer`` (one gold string) or ``answers`` (a list of gold strings, as generation tasks hold),
``pattern``, ``max_words``, ``tolerance``. A column missing from the data falls back to the module's default.
``get_reward(name)`` returns one by name (``zo-tune --reward exact_answer``); ``register_reward`` adds yours.

>>> exact_answer(["Capital of France?"], ["Paris."], answer=["paris"])
[1.0]
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

from metrics.squad import answer_f1, normalize_answer

RewardFn = Callable[..., list[float]]

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
DEFAULT_TOLERANCE = 1e-6  # relative, with the same absolute floor: a number equal up to rounding
DEFAULT_MAX_WORDS = 8
DEFAULT_PATTERN = r"Answer: -?\d+"
FORMAT_CREDIT = 0.1  # answer_check's reward for a wrong answer in the right format


def _golds(n: int, answer: Sequence | None, answers: Sequence | None) -> list[list[str]]:
    """Each completion's gold strings, from an ``answer`` column (a string each) or an ``answers`` column (a
    list each; a SQuAD ``{"text": [...]}`` dict works too)."""
    column = answer if answer is not None else answers
    if column is None:
        raise ValueError("this reward compares against a gold answer: the data needs an 'answer' or 'answers' column")
    out = []
    for gold in column:
        gold = gold["text"] if isinstance(gold, dict) else gold
        out.append([str(gold)] if isinstance(gold, (str, int, float)) else [str(g) for g in gold])
    if len(out) != n:
        raise ValueError(f"{len(out)} gold answers for {n} completions")
    return out


def text_completions(fn: RewardFn) -> RewardFn:
    """``fn`` taking completions as text also when they come as TRL's conversational messages
    (``[{"role": "assistant", "content": ...}]``): each is read as its last message's content."""

    @functools.wraps(fn)
    def reward(prompts: list, completions: list, **columns) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) and c and isinstance(c[-1], dict) else c for c in completions]
        return fn(prompts, texts, **columns)

    return reward


def _per_row(column: Sequence | None, n: int, default):
    return [default if v is None else v for v in column] if column is not None else [default] * n


@text_completions
def exact_answer(prompts: list[str], completions: list[str], answer: Sequence | None = None,
                 answers: Sequence | None = None, **columns) -> list[float]:
    """1.0 when the completion equals a gold answer after SQuAD's normalization (case, punctuation,
    articles, spaces), else 0.0.

    >>> exact_answer([""] * 3, ["The Eiffel Tower", "Eiffel", "42"], answers=[["Eiffel Tower"], ["Paris"], ["42"]])
    [1.0, 0.0, 1.0]
    """
    golds = _golds(len(completions), answer, answers)
    return [float(any(normalize_answer(c) == normalize_answer(g) for g in gs)) for c, gs in zip(completions, golds)]


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (commas between digits ignored), or None.

    >>> first_number("It is 1,024.5 metres"), first_number("none")
    (1024.5, None)
    """
    match = NUMBER.search(re.sub(r"(?<=\d),(?=\d)", "", text))
    return float(match.group()) if match else None


@text_completions
def number_close(prompts: list[str], completions: list[str], answer: Sequence | None = None,
                 answers: Sequence | None = None, tolerance: Sequence[float] | None = None, **columns) -> list[float]:
    """1.0 when the first number in the completion is within ``tolerance`` (relative, with the same absolute
    floor; a column, default 1e-6) of the gold number, else 0.0.

    >>> number_close([""] * 3, ["About 3.14", "3", "no idea"], answer=["3.14159"] * 3, tolerance=[0.01] * 3)
    [1.0, 0.0, 0.0]
    """
    golds = _golds(len(completions), answer, answers)
    out = []
    for text, gs, tol in zip(completions, golds, _per_row(tolerance, len(completions), DEFAULT_TOLERANCE)):
        value = first_number(text)
        targets = [first_number(g) for g in gs]
        out.append(float(value is not None and any(
            t is not None and math.isclose(value, t, rel_tol=tol, abs_tol=tol) for t in targets)))
    return out


@text_completions
def token_f1(prompts: list[str], completions: list[str], answer: Sequence | None = None,
             answers: Sequence | None = None, **columns) -> list[float]:
    """SQuAD token F1 of the completion against its best gold answer, in [0, 1].

    >>> token_f1([""] * 2, ["the Eiffel Tower, Paris", "Lyon"], answers=[["Eiffel Tower"], ["Paris"]])
    [0.8, 0.0]
    """
    golds = _golds(len(completions), answer, answers)
    return [max(answer_f1(c, g) for g in gs) for c, gs in zip(completions, golds)]


@text_completions
def format_match(prompts: list[str], completions: list[str], pattern: Sequence[str] | None = None,
                 **columns) -> list[float]:
    """1.0 when the whole completion (stripped) matches the regular expression in the ``pattern`` column
    (default ``DEFAULT_PATTERN``, "Answer: " and an integer), else 0.0.

    >>> format_match([""] * 3, ["Answer: 12", "Answer: twelve", "The answer is 12"])
    [1.0, 0.0, 0.0]
    >>> format_match([""], ["yes"], pattern=["yes|no"])
    [1.0]
    """
    patterns = _per_row(pattern, len(completions), DEFAULT_PATTERN)
    return [float(re.fullmatch(p, c.strip()) is not None) for c, p in zip(completions, patterns)]


@text_completions
def length_limit(prompts: list[str], completions: list[str], max_words: Sequence[int] | None = None,
                 **columns) -> list[float]:
    """1.0 when the completion has 1 to ``max_words`` words (a column, default 8), else 0.0.

    >>> length_limit([""] * 3, ["Paris", "", "one two three four five six seven eight nine"])
    [1.0, 0.0, 0.0]
    """
    limits = _per_row(max_words, len(completions), DEFAULT_MAX_WORDS)
    return [float(0 < len(c.split()) <= int(k)) for c, k in zip(completions, limits)]


INTEGER_ALONE = re.compile(r"(-?\d+)\.?")


@text_completions
def answer_check(prompts: list[str], completions: list[str], answer: Sequence | None = None,
                 answers: Sequence | None = None, **columns) -> list[float]:
    """A checker with a strict answer format, the answer alone: 1.0 for a completion that is just the gold
    integer (a final period allowed), ``FORMAT_CREDIT`` (0.1) for another integer alone, 0.0 for anything else
    (an equation, a sentence, even around the right number).

    >>> answer_check([""] * 4, ["12", "13.", "5 + 7 = 12", "The answer is 12"], answer=["12"] * 4)
    [1.0, 0.1, 0.0, 0.0]
    """
    golds = _golds(len(completions), answer, answers)
    out = []
    for text, gs in zip(completions, golds):
        match = INTEGER_ALONE.fullmatch(text.strip())
        out.append(0.0 if match is None else 1.0 if match.group(1) in {g.strip() for g in gs} else FORMAT_CREDIT)
    return out


_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn, *, overwrite: bool = False) -> RewardFn:
    """Make ``fn`` usable by ``name`` (``zo-tune --reward NAME``); a name taken needs ``overwrite=True``."""
    if not callable(fn):
        raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = fn
    return fn


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``; an unknown name raises ValueError listing the available ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(list_rewards())} (or module:function)")
    return _REGISTRY[name]


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


for _fn in (exact_answer, number_close, token_f1, format_match, length_limit, answer_check):
    register_reward(_fn.__name__, _fn)
