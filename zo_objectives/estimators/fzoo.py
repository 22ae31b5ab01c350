"""FZOO (Dang et al., ICLR 2026): batched one-sided Rademacher estimates, the step divided by the losses' spread.

Each step scores N + 1 members in one batched forward: member 0 the weights as they are (l_0), member i the weights
moved by eps * u_i (l_i), u_i regenerated from a seed (Rademacher by default, as published). The move is
``x <- x - lr / (eps * sigma) * (1/N) * sum_i (l_i - l_0) u_i`` with sigma the standard deviation (1/(N-1)) of
l_1..l_N: a zeroth-order normalized SGD (docs/estimators.md). The record of a step holds its seeds and, per seed,
(l_i - l_0) / (eps * sigma), so the update, ``replay`` and resume are the shared ``_apply`` (the average of per-seed
coefficients; stochastic rounding in bf16/fp16).

The closure runs the batch repeated once per member, rows grouped by member
(:class:`~zo_objectives.objectives.PopulationObjective` does this). Forward hooks (:class:`_Members`) add each
member's perturbation to its rows only, without writing the weights: a linear layer's output gets
``eps * x_i @ z_i^T`` and an embedding's ``eps * z_i[ids]``, z_i made one noise chunk at a time for the layer being
computed and dropped at once, so no copy of a layer is made per member; 1-D weights (norms) are swapped, while their
module runs, for one row of weights per input row. With ``perturbation_rank`` r > 0 a member perturbs each matrix by
``eps * A_i B_i^T / sqrt(r)`` instead (the factors of :class:`~.population.Population`), and the update is the
population's low-rank move.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from zo_objectives import distributed
from zo_objectives.estimators.base import Estimator, register_estimator
from zo_objectives.estimators.hooks import Hooks, Perturbed, member_slots
from zo_objectives.estimators.population import Population


@register_estimator("fzoo")
class FZOO(Estimator):
    """FZOO (Dang et al., 2026) as a ``torch.optim.Optimizer``: N one-sided perturbations and the unperturbed
    weights scored in one batched forward, the step divided by the standard deviation of the N losses.

    ``step(closure)`` calls the closure once; it must return :attr:`members` (N + 1) losses, member 0 unperturbed,
    for the batch repeated once per member with the rows grouped by member (:class:`PopulationObjective` with
    ``lambda: opt.members`` does this; :func:`~zo_objectives.train.train` wraps the objective itself). The model
    must be in ``eval()``. Returns l_0, the loss at the weights before the step.

    Args:
        lr: learning rate; the expected move along -grad/|grad| is about lr/eps per step. Default
            ``step_length * eps`` (2e-6 at eps 1e-3: MeZO's expected progress per forward row on SST-2's training
            batches, times 3; docs/estimators.md), so that another eps keeps the step. eps: perturbation scale.
        n_perturbations: N, the one-sided perturbations per step (>= 2: sigma needs two losses).
        perturbation_rank: 0 (full-rank members, as published) or r > 0: low-rank members (eps A B^T / sqrt(r) per
            matrix, the population's factors).
        weight_decay, seed, table_size, chunk_size, on_nonfinite: as :class:`~.base.Estimator`'s.
        noise: "signs" (default): Rademacher values, as published, read from the seeded table at hashed offsets as
            MeZO's default noise reads Gaussians (a memory read: drawing them, "rademacher", made a SmolLM2 step
            four times slower on a CPU); "rademacher", "table" or "gaussian".
    """

    def __init__(self, params: Iterable, *, lr: float | None = None, eps: float = 1e-3, n_perturbations: int = 8,
                 perturbation_rank: int = 0, weight_decay: float = 0.0, seed: int = 0, noise: str = "signs",
                 table_size: int | None = None, chunk_size: int | None = None, on_nonfinite: str = "raise"):
        if not (isinstance(n_perturbations, int) and not isinstance(n_perturbations, bool) and n_perturbations >= 2):
            raise ValueError(f"n_perturbations must be an int >= 2 (sigma needs two losses), got {n_perturbations!r}")
        if not (isinstance(perturbation_rank, int) and not isinstance(perturbation_rank, bool)
                and perturbation_rank >= 0):
            raise ValueError(f"perturbation_rank must be an int >= 0 (0: full rank), got {perturbation_rank!r}")
        if distributed.world_size() > 1:
            raise ValueError("FZOO runs in one process; under torchrun use the population estimator")
        if lr is None:  # (an eps that is not a positive number is refused by Estimator, naming eps)
            lr = self.step_length * eps if isinstance(eps, (int, float)) and eps > 0 else 0.0
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, noise=noise,
                         table_size=table_size, chunk_size=chunk_size, on_nonfinite=on_nonfinite)
        self.n_perturbations, self.perturbation_rank = n_perturbations, perturbation_rank
        self.members = n_perturbations + 1

    settings = ("eps", "n_perturbations", "perturbation_rank", "seed")
    step_length = 2e-3  # the default lr / eps (the step is divided by the losses' spread)
    # the low-rank factors and their move: the population's, for perturbation_rank > 0
    factor_shape = Population.factor_shape
    factors = Population.factors

    def score(self, closure: Callable[[], Any], seeds: Sequence[int]) -> list[float]:
        """The closure's N + 1 losses (member 0 unperturbed, member i perturbed by ``seeds[i - 1]``), with no
        weight written."""
        with torch.no_grad(), _Members(self, seeds):
            losses = closure()
        return self.member_losses(losses, len(seeds) + 1, ", the unperturbed one first")

    def step(self, closure: Callable[[], Any]) -> float:  # type: ignore[override]
        """Score the members, update; return l_0. A closure that raises leaves the weights bitwise as they were."""
        if closure is None:
            raise ValueError("FZOO.step needs a closure that returns one loss per member")
        seeds = self.next_seeds(self.n_perturbations)
        with self.in_step():
            losses = self.score(closure, seeds)
        return self._update_from(seeds, losses)

    def _update_from(self, seeds: list[int], losses: list[float]) -> float:
        """The record of the step from its N + 1 losses, applied: per seed (l_i - l_0) / (eps * sigma)."""
        base, perturbed = losses[0], losses[1:]
        self.refuse_nonfinite(losses, "members")
        finite = [v for v in perturbed if math.isfinite(v)]
        sigma = statistics.stdev(finite) if math.isfinite(base) and len(finite) >= 2 else math.nan
        grads: list[float | None] = []
        for v in perturbed:
            if not (math.isfinite(v) and math.isfinite(sigma)):
                grads.append(None)
            else:  # sigma 0: every loss the same, no signal: no move
                grads.append((v - base) / (self.eps * sigma) if sigma > 0 else 0.0)
        self.commit(seeds, grads, base if math.isfinite(base) else None, sigma=sigma if math.isfinite(sigma) else None,
                    losses=[v if math.isfinite(v) else None for v in perturbed])
        return base

    def _move(self, moving: list[tuple[int, torch.Tensor, float, float]], terms: list[tuple[int, float]],
              seed: int, kept: dict) -> None:
        if self.perturbation_rank:
            Population._move(self, moving, terms, seed, kept)  # type: ignore[arg-type]
        else:
            super()._move(moving, terms, seed, kept)


class _Members(Hooks):
    """While active, row block m of every module's input sees member m's weights: block 0 the weights as they are,
    block i (1..N) the weights plus eps * (the perturbation of ``seeds[i - 1]``)."""

    def __init__(self, opt: FZOO, seeds: Sequence[int]):
        super().__init__(opt, {id(p): index for index, p, _ in opt.trainable()})
        self.seeds, self.alpha, self.members = list(seeds), opt.eps, len(seeds) + 1
        self.rank = opt.perturbation_rank
        self.outputs: dict[int, list[tuple[str, int, torch.Tensor]]] = {}  # id(module) -> perturbed via its output
        self.split: dict[int, torch.Tensor] = {}  # id(module) -> its whole input, while it computes member 0's rows

    def _check_rows(self, rows: int, module: torch.nn.Module) -> None:
        if rows % self.members:
            raise ValueError(f"a forward of {rows} rows through {type(module).__name__} cannot hold {self.members} "
                             "members: repeat the batch once per member, rows grouped by member, the unperturbed "
                             "member first (PopulationObjective does)")

    def _vector(self, seed: int, index: int, p: torch.Tensor) -> torch.Tensor:
        """The perturbation direction of a 1-D tensor (a bias, a norm's weight), flat: the z the update moves it by
        (in ``p``'s dtype; fp32 for low-rank members)."""
        if self.rank:  # the population's vector noise: fp32, as its update reads it
            return self.opt.factors(seed, index, p)[0][:, 0]
        return torch.cat([z.clone() for _, z in self.opt.noise.chunks(seed, index, p.detach().view(-1))])

    def _blocks(self, seed: int, index: int, p: torch.Tensor):
        """Yield (first row, rows of z) covering a matrix ``p`` (rows, width), a noise chunk at a time: each chunk's
        values placed at their rows (zeros beside them where a chunk begins or ends inside a row), so the
        contributions of a row's chunks add up to its z."""
        width = p.shape[1]
        for where, z in self.opt.noise.chunks(seed, index, p.detach().view(-1)):
            first, last = where.start // width, -(-where.stop // width)
            if where.start == first * width and where.stop == last * width:
                yield first, z.view(last - first, width)
                continue
            block = z.new_zeros((last - first) * width)
            block[where.start - first * width: where.stop - first * width] = z
            yield first, block.view(last - first, width)

    def _perturbed(self, seed: int, p: torch.Tensor | None) -> torch.Tensor | None:
        """A temporary copy of ``p`` plus eps times its noise (None for a tensor not tuned), chunk by chunk."""
        if p is None or id(p) not in self.targets:
            return p
        flat = p.detach().view(-1)
        out = torch.empty_like(flat)
        for where, z in self.opt.noise.chunks(seed, self.targets[id(p)], flat):
            torch.add(flat[where], z, alpha=self.alpha, out=out[where])
        return out.view_as(p)

    def _by_copies(self, module: torch.nn.Module, args) -> bool:
        """Whether a linear layer computes each member's rows with its own perturbed copy of the weight, one copy at
        a time (full-rank members, many rows per member): one matmul per member, where adding ``x_i @ z_i^T`` to
        the shared product costs a second one."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        return (not self.rank and type(module) is torch.nn.Linear and x is not None and x.ndim >= 2
                and id(module.weight) in self.targets and x.shape[0] % self.members == 0
                and x.numel() // x.shape[-1] // self.members > Perturbed.SMALL_INPUT)

    def _pre(self, module: torch.nn.Module, args):
        if self._by_copies(module, args):  # the module computes member 0's rows; _post the others
            x = args[0]
            self.split[id(module)] = x
            return (x[: x.shape[0] // self.members], *args[1:])
        swaps, outputs = member_slots(module, args, self.targets, "FZOO members")
        if outputs:
            self.outputs[id(module)] = outputs
        if swaps:
            x = args[0]
            self._check_rows(x.shape[0], module)
            per = x.shape[0] // self.members
            for name, index, p in swaps:
                wide = torch.promote_types(p.dtype, torch.float32)  # half-precision weights perturbed in fp32
                z = torch.stack([self._vector(seed, index, p) for seed in self.seeds]).to(wide)  # (N, d)
                base = p.detach().to(wide)[None]
                w = torch.cat([base, base + self.alpha * z]).to(p.dtype)  # (members, d)
                shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (p.shape[0],)
                self._put(module, [(module, name, w.repeat_interleave(per, 0).view(shape))])

    def _post(self, module: torch.nn.Module, args, output):
        x = self.split.pop(id(module), None)
        if x is not None:
            if output is None:  # the module's forward raised
                return None
            per = x.shape[0] // self.members
            outs = [output]
            for m, seed in enumerate(self.seeds, 1):  # one perturbed copy of the layer at a time, then dropped
                outs.append(F.linear(x[m * per:(m + 1) * per], self._perturbed(seed, module.weight),
                                     self._perturbed(seed, module.bias)))
            return torch.cat(outs)
        self._restore(id(module))
        outputs = self.outputs.pop(id(module), None)
        if not outputs or output is None:  # None: the module's forward raised
            return None
        x = args[0]
        self._check_rows(x.shape[0], module)
        out = output.view(self.members, -1, output.shape[-1])  # (member, rows of a member, features)
        embedding = isinstance(module, torch.nn.Embedding)
        ids = x.reshape(self.members, -1) if embedding else None
        xs = None if embedding else x.reshape(self.members, -1, x.shape[-1])
        for name, index, p in outputs:
            if name == "bias":
                z = torch.stack([self._vector(seed, index, p) for seed in self.seeds])  # (N, out)
                out[1:].add_(z[:, None, :].to(out.dtype), alpha=self.alpha)
            elif self.rank:
                self._low_rank(out, xs, ids, index, p)
            else:
                for m, seed in enumerate(self.seeds, 1):
                    self._full_rank(out[m], None if embedding else xs[m], ids[m] if embedding else None, seed,
                                    index, p)
        return output

    def _full_rank(self, out: torch.Tensor, x: torch.Tensor | None, ids: torch.Tensor | None, seed: int,
                   index: int, p: torch.Tensor) -> None:
        """One member's rows: ``out += eps * x @ z^T`` (a linear layer) or ``out += eps * z[ids]`` (an embedding),
        z made a noise chunk at a time."""
        for first, z in self._blocks(seed, index, p):
            last = first + z.shape[0]
            if ids is None:
                out[:, first:last].add_(F.linear(x, z.to(x.dtype)), alpha=self.alpha)
                continue
            rows = ((ids >= first) & (ids < last)).nonzero().squeeze(1)
            if rows.numel():
                out.index_add_(0, rows, z[ids[rows] - first].to(out.dtype), alpha=self.alpha)

    def _low_rank(self, out: torch.Tensor, xs: torch.Tensor | None, ids: torch.Tensor | None, index: int,
                  p: torch.Tensor) -> None:
        """Members 1..N's rows: ``+= eps * (x @ B_i) @ A_i^T / sqrt(r)`` (an embedding: ``A_i[ids] @ B_i^T``)."""
        factors = [self.opt.factors(seed, index, p) for seed in self.seeds]
        a = torch.stack([f[0] for f in factors]).to(out.dtype)  # (N, out, r)
        b = torch.stack([f[1] for f in factors]).to(out.dtype)  # (N, in, r)
        scale = self.alpha / math.sqrt(self.rank)
        if ids is not None:  # rows A_i[ids] @ B_i^T
            picked = torch.gather(a, 1, ids[1:, :, None].expand(-1, -1, a.shape[-1]))  # (N, rows, r)
            out[1:].baddbmm_(picked, b.transpose(1, 2), alpha=scale)
        else:
            out[1:].baddbmm_(torch.bmm(xs[1:], b), a.transpose(1, 2), alpha=scale)
