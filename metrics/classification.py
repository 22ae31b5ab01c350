"""Classification metrics: plain functions of (predictions, references), means in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import f1_score


def check_lengths(predictions: Sequence, references: Sequence) -> None:
    """Raise ``ValueError`` unless both are non-empty and of equal length."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; lengths must match")
    if len(predictions) == 0:
        raise ValueError("no predictions: a metric needs at least one example")


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference."""
    check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(predictions)


def f1(predictions: Sequence, references: Sequence) -> float:
    """Macro-averaged F1 over the classes present in either list (scikit-learn)."""
    check_lengths(predictions, references)
    return float(f1_score(list(references), list(predictions), average="macro", zero_division=0))


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    check_lengths(predictions, references)
    return sum(str(p).strip() == str(r).strip() for p, r in zip(predictions, references)) / len(predictions)
