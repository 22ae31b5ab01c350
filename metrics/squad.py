"""SQuAD v1.1 exact match and F1, as the official evaluation script defines them."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from metrics.classification import check_lengths

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _golds(reference: str | Sequence[str]) -> list[str]:
    golds = [reference] if isinstance(reference, str) else list(reference)
    if not golds:
        raise ValueError("a SQuAD reference needs at least one gold answer")
    return golds


def squad_em(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over questions of max over gold answers of normalized exact match."""
    check_lengths(predictions, references)
    return sum(
        max(float(normalize_answer(p) == normalize_answer(g)) for g in _golds(r))
        for p, r in zip(predictions, references)
    ) / len(predictions)


def squad_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over questions of max over gold answers of token-overlap F1."""
    check_lengths(predictions, references)
    return sum(max(_token_f1(p, g) for g in _golds(r)) for p, r in zip(predictions, references)) / len(predictions)
