"""SQuAD v1.1 exact match and F1, as the official evaluation script defines them."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

from metrics.classification import check_lengths

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

Reference = str | Sequence[str] | Mapping[str, Sequence]


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace.

    >>> normalize_answer("The  Eiffel Tower!")
    'eiffel tower'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _golds(reference: Reference) -> list[str]:
    """A reference's gold answers: one string, a list of strings, or a SQuAD ``answers`` dict (its "text")."""
    if isinstance(reference, Mapping):
        if "text" not in reference:
            raise ValueError(f"a SQuAD reference dict needs a 'text' list of gold answers; got keys {list(reference)}")
        reference = reference["text"]
    golds = [reference] if isinstance(reference, str) else list(reference)
    if not golds:
        raise ValueError("a SQuAD reference needs at least one gold answer")
    if not all(isinstance(g, str) for g in golds):
        raise TypeError(f"SQuAD gold answers must be strings, got {golds!r:.80}; accepted references: a string, a "
                        "list of strings, or a dict with a 'text' list")
    return golds


def _checked(predictions: Sequence[str], references: Sequence[Reference]) -> list[tuple[str, list[str]]]:
    check_lengths(predictions, references)
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise TypeError(f"prediction {i} is {p!r:.60} ({type(p).__name__}); SQuAD metrics compare strings")
    return [(p, _golds(r)) for p, r in zip(predictions, references)]


def squad_em(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean over questions of max over gold answers of normalized exact match.

    >>> squad_em(["The Eiffel Tower."], [{"text": ["Eiffel Tower", "the tower"], "answer_start": [0, 4]}])
    1.0
    """
    pairs = _checked(predictions, references)
    return sum(max(float(normalize_answer(p) == normalize_answer(g)) for g in golds) for p, golds in pairs) / len(pairs)


def squad_f1(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean over questions of max over gold answers of token-overlap F1.

    >>> squad_f1(["the Eiffel Tower, Paris"], [["Eiffel Tower"]])
    0.8
    """
    pairs = _checked(predictions, references)
    return sum(max(answer_f1(p, g) for g in golds) for p, golds in pairs) / len(pairs)
