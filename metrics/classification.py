"""Classification metrics: plain functions of (predictions, references), means in [0, 1]."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any


def check_lengths(predictions: Sequence, references: Sequence) -> None:
    """Raise ``ValueError`` unless both are non-empty and of equal length."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; lengths must match")
    if len(predictions) == 0:
        raise ValueError("no predictions: a metric needs at least one example")


def _label(value: Any, what: str, index: int) -> str | numbers.Number:
    """One label: a string or a number (a 0-d numpy array or tensor counts as its item)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (str, numbers.Number)):
        return value
    shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
    raise TypeError(f"{what} {index} is {value!r:.60} ({type(value).__name__}{shape}); a label must be one string "
                    "or number per example")


def check_labels(predictions: Sequence, references: Sequence) -> tuple[list, list]:
    """Lengths checked, each label a string or a number, and not strings mixed with numbers (as scikit-learn
    refuses them: ``1 == "1"`` is False, so a mix silently scores 0)."""
    check_lengths(predictions, references)
    preds = [_label(p, "prediction", i) for i, p in enumerate(predictions)]
    refs = [_label(r, "reference", i) for i, r in enumerate(references)]
    kinds = {isinstance(x, str) for x in preds + refs}
    if len(kinds) == 2:
        raise TypeError(f"labels mix strings and numbers (predictions {preds[:4]}, references {refs[:4]}); "
                        "use one type for both")
    return preds, refs


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference.

    >>> accuracy([1, 0, 2], [1, 1, 2])
    0.6666666666666666
    """
    preds, refs = check_labels(predictions, references)
    return sum(p == r for p, r in zip(preds, refs)) / len(preds)


def f1(predictions: Sequence, references: Sequence) -> float:
    """Macro-averaged F1 over the classes present in either list (scikit-learn)."""
    from sklearn.metrics import f1_score  # imported here: scikit-learn costs ~1 s and most runs never use it

    preds, refs = check_labels(predictions, references)
    return float(f1_score(refs, preds, average="macro", zero_division=0))


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    check_lengths(predictions, references)
    preds = [str(_label(p, "prediction", i)).strip() for i, p in enumerate(predictions)]
    return sum(p == str(r).strip() for p, r in zip(preds, references)) / len(preds)
