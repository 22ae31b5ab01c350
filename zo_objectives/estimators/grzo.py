"""GRZO (Tan et al., 2026): one perturbation per example, the step divided by the spread of the examples' estimates.

A MeZO step projects the batch's gradient on one direction, from 2 x B forward rows. GRZO spends the same rows on
B directions: example k is scored at x + eps z_k and at x - eps z_k (its own antithetic pair), so
delta_k = l_k(x + eps z_k) - l_k(x - eps z_k) projects example k's gradient on z_k. The step is
``x <- x - lr / (2 eps B) * sum_k (delta_k / s) z_k`` with s the standard deviation (1/B) of the delta_k: the
group-relative normalization of GRPO's advantages, which makes the step's length independent of the loss's
scale. Where the examples' gradients agree, the B directions teach more per forward row than MeZO's one
(BENCHMARKS.md "Per-example directions" measures by how much on SST-2; docs/estimators.md).

Here z_k is the population's low-rank member (eps A_k B_k^T / sqrt(r) per matrix, full-rank noise for vectors:
:class:`~.population.Population`, whose forward hooks and update this reuses), not the paper's Flipout-style
sign-factored full-rank one (a shared Gaussian base times per-example sign vectors): the rows, the directions per
step and the normalization are the paper's, the shape of each direction is the population's. The closure returns
2 x B losses, example k's pair as members 2k and 2k + 1 (:class:`~zo_objectives.objectives.PerExampleObjective`
does this in one batched pass; :func:`~zo_objectives.train.train` wraps the objective itself).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from zo_objectives import distributed
from zo_objectives.estimators.base import register_estimator
from zo_objectives.estimators.population import Population


@register_estimator("grzo")
class GRZO(Population):
    """GRZO (Tan et al., 2026) as a ``torch.optim.Optimizer``: an antithetic pair of low-rank perturbations per
    example, all scored in one batched forward, the step divided by the spread of the examples' differences.

    ``step(closure)`` calls the closure once; it returns 2 x ``batch_size`` losses, the losses of example k under
    +eps z_k and -eps z_k as members 2k and 2k + 1, each member's rows its example's only
    (:class:`~zo_objectives.objectives.PerExampleObjective`). Returns the mean of the losses.

    Args:
        lr: learning rate; the step is lr / (2 eps) times a normalized estimate. Default ``step_length * eps``
            (2e-6 at eps 1e-3), so that another eps keeps the step. eps: perturbation scale.
        batch_size: B, the examples a step scores (each its own direction); the batches ``train`` draws must
            have this size.
        perturbation_rank: r, the rank of each direction's part in a matrix.
        weight_decay, seed, noise, table_size, chunk_size, on_nonfinite: as :class:`~.base.Estimator`'s.
    """

    settings = ("eps", "batch_size", "perturbation_rank", "seed")
    per_example = True  # train() scores example k under members 2k and 2k + 1 (PerExampleObjective)
    step_length = 2e-3  # the default lr / eps: FZOO's (the step is normalized as FZOO's; not tuned on a grid)

    def __init__(self, params: Iterable, *, lr: float | None = None, eps: float = 1e-3, batch_size: int = 16,
                 perturbation_rank: int = 1, weight_decay: float = 0.0, seed: int = 0, noise: str = "table",
                 table_size: int | None = None, chunk_size: int | None = None, on_nonfinite: str = "raise"):
        if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 2):
            raise ValueError(f"batch_size must be an int >= 2 (the spread needs two examples), got {batch_size!r}")
        if distributed.world_size() > 1:
            raise ValueError("GRZO runs in one process; under torchrun use the population estimator")
        if lr is None:  # (an eps that is not a positive number is refused by Estimator, naming eps)
            lr = self.step_length * eps if isinstance(eps, (int, float)) and eps > 0 else 0.0
        super().__init__(params, lr=lr, eps=eps, population=2 * batch_size, perturbation_rank=perturbation_rank,
                         weight_decay=weight_decay, seed=seed, noise=noise, table_size=table_size,
                         chunk_size=chunk_size, on_nonfinite=on_nonfinite)
        self.batch_size = batch_size

    def step(self, closure: Callable[[], Any]) -> float:  # type: ignore[override]
        """Score every example's pair, update; return the mean loss. A closure that raises leaves the weights
        bitwise as they were."""
        if closure is None:
            raise ValueError("GRZO.step needs a closure that returns two losses per example")
        seeds = self.next_seeds(self.batch_size)
        with self.in_step():
            losses = self.score(closure, seeds)
        deltas = [plus - minus for plus, minus in zip(losses[0::2], losses[1::2])]
        self.refuse_nonfinite(losses, "examples")
        finite = [d for d in deltas if math.isfinite(d)]
        spread = statistics.pstdev(finite) if len(finite) >= 2 else math.nan
        grads: list[float | None] = []
        for d in deltas:
            if not (math.isfinite(d) and math.isfinite(spread)):
                grads.append(None)
            else:  # spread 0: every difference the same (all 0 when a hard metric ties): no move
                grads.append(d / spread / (2 * self.eps) if spread > 0 else 0.0)
        seen = [v for v in losses if math.isfinite(v)]
        return self.commit(seeds, grads, sum(seen) / len(seen) if seen else None,
                           spread=spread if math.isfinite(spread) else None)
