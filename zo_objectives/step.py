"""Which optimizer step is running: a context objectives and scoring read without importing an estimator.

An estimator's ``step`` runs its closure calls inside :func:`in_step`; an objective keys by :func:`current_step`
what it keeps for one step (a reward's sampled candidates), and sampling draws new numbers each step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_STEP: ContextVar[tuple[int, int] | None] = ContextVar("zo_objectives_step", default=None)


def current_step() -> tuple[int, int] | None:
    """(seed, index) of the step whose closure is running, None outside one. The index is the number of steps
    before (a resumed run replays its trajectory, so it counts on where it stopped)."""
    return _STEP.get()


@contextmanager
def in_step(seed: int, index: int) -> Iterator[None]:
    """While the block runs, :func:`current_step` is ``(seed, index)``."""
    token = _STEP.set((seed, index))
    try:
        yield
    finally:
        _STEP.reset(token)
