"""Populations: many seeded low-rank perturbations scored in one batched forward pass (EGGROLL-style ES).

Each step draws ``population`` members in antithetic pairs: member 2k perturbs every trainable matrix W (out, in)
by ``+eps * A_k B_k^T / sqrt(r)`` and member 2k+1 by its negative, with A_k (out, r) and B_k (in, r) regenerated
from (the pair's seed, the tensor's index) by the same :class:`~zo_objectives.noise.Noise` MeZO uses (unit
variance per entry of A B^T / sqrt(r)); vectors (norms, biases) get full-rank noise z_k, as in MeZO. The closure
scores all members at once, on the batch repeated once per member with the rows grouped by member: forward hooks
add each member's perturbation to its rows only (:class:`~zo_objectives.estimators.hooks.Members`), and the weights are
never written while scoring: a closure that raises leaves them bitwise unchanged.

The update, the only write, is the low-rank sum of the pairs' estimates g_k = (loss_2k - loss_2k+1) / (2 eps), as
MeZO's n-SPSA average: W -= lr/P * sum_k g_k A_k B_k^T / sqrt(r), one matmul ``A_stack @ (B_stack * g).T`` per
block of rows, computed in fp32 and stochastically rounded in bf16/fp16 with bits regenerated from the step's seed
(MeZO's update but for the move itself), so ``replay`` and resume are bitwise. Under torchrun the pairs are split
across ranks; each rank scores its members on the whole batch and only the losses are all-gathered
(:func:`exchange_losses`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from zo_objectives import distributed
from zo_objectives.estimators.base import Estimator, register_estimator
from zo_objectives.estimators.hooks import Members
from zo_objectives.noise import HALF, chunk_update

EXCHANGE_TIMEOUT = timedelta(seconds=60)  # a rank that stops answering stops the others within this


@register_estimator("population")
class Population(Estimator):
    """Evolution strategies with low-rank perturbations (EGGROLL, 2025), all members scored in one batched pass.

    ``step(closure)`` calls the closure once, with the weights perturbed per row block (:mod:`.hooks`); the
    closure returns one loss per member (:attr:`members` of them: all of ``population`` in one process, this
    rank's share under torchrun), for the batch repeated once per member with the rows grouped by member
    (:class:`~zo_objectives.objectives.PopulationObjective` does this for the objectives of this package). The
    model must be in ``eval()``. Settings as :class:`~.base.Estimator`'s (``eps`` is sigma, the perturbation
    scale), plus:

    Args:
        population: members per step, an even number (antithetic pairs); under torchrun a multiple of
            2 * world size.
        perturbation_rank: r, the rank of each member's perturbation of a matrix.
    """

    settings = ("eps", "population", "perturbation_rank", "seed", "update", "fitness_shaping")

    def __init__(self, params: Iterable, *, lr: float = 1e-5, eps: float = 1e-3, population: int = 8,
                 perturbation_rank: int = 1, weight_decay: float = 0.0, seed: int = 0, noise: str = "table",
                 table_size: int | None = None, chunk_size: int | None = None, update: str = "sgd",
                 fitness_shaping: str = "none", on_nonfinite: str = "raise"):
        if not (isinstance(population, int) and not isinstance(population, bool) and population >= 2
                and population % 2 == 0):
            raise ValueError(f"population must be an even int >= 2 (antithetic pairs), got {population!r}")
        if not (isinstance(perturbation_rank, int) and not isinstance(perturbation_rank, bool)
                and perturbation_rank >= 1):
            raise ValueError(f"perturbation_rank must be an int >= 1, got {perturbation_rank!r}")
        world = distributed.world_size()
        if population % (2 * world):
            raise ValueError(f"population {population} does not split into pairs over {world} ranks: use a "
                             f"multiple of {2 * world}")
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, noise=noise,
                         table_size=table_size, chunk_size=chunk_size, update=update, fitness_shaping=fitness_shaping,
                         on_nonfinite=on_nonfinite)
        self.population, self.perturbation_rank = population, perturbation_rank
        self.members = population // world
        self._reported = False

    def factor_shape(self, p: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of A and B for a matrix (viewed as (shape[0], rest)); (n, 0) for a vector."""
        return (p.shape[0], p.numel() // p.shape[0]) if p.ndim >= 2 else (p.numel(), 0)

    def factors(self, seed: int, index: int, p: torch.Tensor,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 (A (out, r), B (in, r)) of a matrix, (z (n, 1), None) of a vector: views of ``out`` (their values
        one after the other) when given."""
        (rows, cols), r = self.factor_shape(p), self.perturbation_rank
        values = torch.empty((rows + cols) * r if cols else rows, device=p.device) if out is None else out
        for where, z in self.noise.chunks(seed, index, values):
            values[where] = z
        if not cols:
            return values.view(rows, 1), None
        return values[: rows * r].view(rows, r), values[rows * r:].view(cols, r)

    def score(self, closure: Callable[[], Any], seeds: Sequence[int]) -> list[float]:
        """The closure's losses, one per member of the pairs ``seeds``, with no weight written."""
        with torch.no_grad(), Members(self, seeds):
            losses = closure()
        return self.member_losses(losses, 2 * len(seeds))

    def step(self, closure: Callable[[], Any]) -> float:  # type: ignore[override]
        """Score the population, update; return the mean loss. A closure that raises leaves the weights as they were."""
        if closure is None:
            raise ValueError("Population.step needs a closure that returns one loss per member")
        seeds = self.next_seeds(self.population // 2)
        mine = seeds[distributed.rank() * self.members // 2:][: self.members // 2]  # this rank's pairs
        with self.in_step():
            losses = exchange_losses(self.score(closure, mine))
        if not self._reported and distributed.world_size() > 1:
            self._reported = True
            if distributed.is_main():
                print(f"population: {exchange_bytes(self)} bytes sent per rank per step (a gradient all-reduce "
                      f"would send {allreduce_bytes(self)})", file=sys.stderr)
        return self.commit(seeds, self.spsa_grads(list(zip(losses[0::2], losses[1::2]))), sum(losses) / len(losses))

    def _move(self, moving: list[tuple[int, torch.Tensor, float, float]], terms: list[tuple[int, float]],
              seed: int, kept: dict) -> None:
        """The writes of :meth:`Estimator._apply`, low-rank: per block of a tensor's rows, ``rows.addmm_(A_stack,
        (B_stack * c).T)`` with c_k = coeff_k / sqrt(r), by :func:`chunk_update` (in fp32, stochastically rounded,
        for half-precision weights)."""
        for index, p, lr, wd in moving:
            matrix = p.detach().view(p.shape[0], -1) if p.ndim >= 2 else p.detach().view(-1, 1)
            a = b = None
            if terms:
                factors = [self.factors(term_seed, index, p) for term_seed, _ in terms]
                coeff = torch.tensor([c for _, c in terms], device=p.device)
                if p.ndim >= 2:  # A (out, terms*r) @ (B (in, terms*r) * c).T
                    r = self.perturbation_rank
                    a = torch.cat([f[0] for f in factors], 1)
                    b = torch.cat([f[1] for f in factors], 1) * coeff.repeat_interleave(r) / math.sqrt(r)
                else:  # z (n, terms) @ c (terms, 1)
                    a, b = torch.cat([f[0] for f in factors], 1), coeff[None, :]
            step_rows = max(1, self.noise.chunk_size // matrix.shape[1])
            decay = 1.0 - lr * wd if wd else 1.0
            for k, start in enumerate(range(0, matrix.shape[0], step_rows)):
                rows = matrix[start:start + step_rows]
                bits = self.noise.rounding_bits(seed, index, k, rows.numel(), rows.device) if p.dtype in HALF else None
                with chunk_update(rows, decay, bits) as acc:
                    if a is not None:
                        acc.addmm_(a[start:start + step_rows].to(acc.dtype), b.T.to(acc.dtype), alpha=-lr)


def exchange_losses(losses: list[float]) -> list[float]:
    """Every rank's member losses, in member order, on every rank (one all_gather of float64 numbers; ``losses``
    in one process). A rank that stopped makes the others raise within EXCHANGE_TIMEOUT, naming it."""
    if distributed.world_size() == 1:
        return losses
    device = distributed.device()
    mine = torch.tensor(losses, dtype=torch.float64, device=device)
    parts = [torch.empty(len(losses), dtype=torch.float64, device=device) for _ in range(distributed.world_size())]
    try:
        if dist.get_backend() == "gloo":  # names the ranks that do not answer, instead of waiting forever
            dist.monitored_barrier(timeout=EXCHANGE_TIMEOUT, wait_all_ranks=True)
        dist.all_gather(parts, mine)
    except RuntimeError as err:
        raise RuntimeError(f"rank {distributed.rank()}: the population's loss exchange failed, a rank stopped or "
                           f"stopped answering: {err}") from err
    return torch.cat(parts).tolist()


def exchange_bytes(opt: Population) -> int:
    """Bytes one rank sends per step: its members' losses (float64), to each other rank."""
    return opt.members * 8 * (distributed.world_size() - 1)


def allreduce_bytes(opt: Population) -> int:
    """Bytes one rank would send per step to all-reduce an fp32 gradient of the trainable weights (a ring)."""
    world = distributed.world_size()
    numel = sum(p.numel() for _, p, _ in opt.trainable())
    return int(2 * (world - 1) / world * numel * 4)
