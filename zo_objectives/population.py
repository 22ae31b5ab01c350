"""Populations: many seeded low-rank perturbations scored in one batched forward pass (EGGROLL-style ES).

Each step draws ``population`` members in antithetic pairs: member 2k perturbs every trainable matrix W (out, in)
by ``+eps * A_k B_k^T / sqrt(r)`` and member 2k+1 by its negative, with A_k (out, r) and B_k (in, r) regenerated
from (the pair's seed, the tensor's index) by the same :class:`~zo_objectives.optimizer.Noise` MeZO uses (unit
variance per entry of A B^T / sqrt(r)); vectors (norms, biases) get full-rank noise z_k, as in MeZO. The closure
scores all members at once, on the batch repeated once per member with the rows grouped by member (member i's
rows are the i-th block of every forward's rows): forward hooks add each member's perturbation to its rows only,
so one shared matmul x W^T serves every member and the extra work is thin matmuls:

- a linear layer: ``output[rows of i] += s_i * eps * ((x_i @ B_k) @ A_k^T) / sqrt(r)`` (and ``s_i * eps * z_k``
  for its bias), an embedding: ``+= s_i * eps * A_k[ids] @ B_k^T / sqrt(r)``;
- any other module's 1-D weight (an RMSNorm's) is swapped, while the module runs, for one row of weights per row
  of input (shape (rows, 1, ..., d)), which broadcasts as the weight did. Other trainable tensors are refused.

No weight-sized copy is made per member, and the weights are never written while scoring: a closure that raises
leaves them bitwise unchanged. The update, the only write, is the low-rank sum of the pairs' estimates
g_k = (loss_2k - loss_2k+1) / (2 eps), as MeZO's n-SPSA average: W -= lr/P * sum_k g_k A_k B_k^T / sqrt(r), one
matmul ``A_stack @ (B_stack * g).T`` per block of rows, computed in fp32 and stochastically rounded in
bf16/fp16 with bits regenerated from the step's seed, so ``replay`` and resume are bitwise. Under torchrun the
pairs are split across ranks; each rank scores its members on the whole batch and only the losses are
all-gathered (:func:`exchange_losses`).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from zo_objectives import distributed
from zo_objectives.objectives import Objective
from zo_objectives.optimizer import HALF, MeZO, _Perturbed, mix, round_stochastic, signals_deferred
from zo_objectives.optimizer import replay as replay_mezo

# modules whose functional form checks the weight's shape: a weight per row of input cannot stand in for theirs
SHAPE_CHECKED = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase)
CACHE_SHARE = 0.02  # factors kept between the forwards of one scoring, as a share of the trainable values
EXCHANGE_TIMEOUT = timedelta(seconds=60)  # a rank that stops answering stops the others within this


class _Members(_Perturbed):
    """While active, row block i of every module's input sees member i's perturbation (see the module docstring).
    Entering and leaving (the process-wide hooks; swapped weights put back even when a forward raises) are
    :class:`_Perturbed`'s."""

    def __init__(self, opt: Population, seeds: Sequence[int]):
        self.opt, self.seeds, self.alpha = opt, list(seeds), opt.eps
        self.targets = {id(p): index for index, p, _ in opt._params()}
        self.swapped: dict[int, tuple[torch.nn.Module, list]] = {}
        self.outputs: dict[int, list[tuple[str, int, torch.Tensor]]] = {}  # id(module) -> perturbed via its output
        self.positions: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # Factors kept for the next forward (each decoding step of generate runs every module again), up to
        # CACHE_SHARE of the trainable values: beyond that they are regenerated, so memory stays near inference's
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.room = CACHE_SHARE * sum(p.numel() for _, p, _ in opt._params())

    def _stack(self, index: int, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every local pair's factors in ``p``'s dtype: A (pairs, out, r) and B (pairs, in, r), or z (pairs, n)."""
        if index in self.cache:
            return self.cache[index]
        (rows, cols), r, noise = self.opt._factor_shape(p), self.opt.perturbation_rank, self.opt.noise
        n = (rows + cols) * r if cols else rows
        if noise.kind == "table":  # one gather for all pairs: the values _factors reads, chunk by chunk
            if (n, p.device) not in self.positions:  # (chunk, place in it) of each value; tensors share shapes
                at = torch.arange(n, device=p.device)
                self.positions[(n, p.device)] = at // noise.chunk_size, at % noise.chunk_size
            chunk, within = self.positions[(n, p.device)]
            offsets = torch.tensor([noise.offsets(seed, index, n) for seed in self.seeds], device=p.device)
            values = noise._table(p.device, p.dtype)[offsets[:, chunk] + within]
        else:
            values = torch.empty(len(self.seeds), n, device=p.device)
            for k, seed in enumerate(self.seeds):
                self.opt._factors(seed, index, p, out=values[k])
            values = values.to(p.dtype)
        factors = (values, None) if not cols else (values[:, : rows * r].view(-1, rows, r),
                                                   values[:, rows * r:].view(-1, cols, r))
        if values.numel() <= self.room:
            self.room -= values.numel()
            self.cache[index] = factors
        return factors

    def _blocks(self, rows: int, module: torch.nn.Module) -> int:
        """Rows per member in a forward of ``rows`` rows."""
        members = 2 * len(self.seeds)
        if rows % members:
            raise ValueError(f"a forward of {rows} rows through {type(module).__name__} cannot hold {members} members: "
                             "repeat the batch once per member, rows grouped by member (PopulationObjective does)")
        return rows // members

    def _pre(self, module: torch.nn.Module, args) -> None:
        swaps, outputs = [], []
        for name, p in module._parameters.items():
            index = self.targets.get(id(p)) if p is not None else None
            if index is None:
                continue
            if type(module) in (torch.nn.Linear, torch.nn.Embedding) and name in ("weight", "bias"):
                if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:
                    raise ValueError("population perturbations do not support an Embedding with max_norm")
                outputs.append((name, index, p))
            elif (p.ndim == 1 and args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 1
                  and not isinstance(module, SHAPE_CHECKED)):
                swaps.append((name, index, p))
            else:
                raise ValueError(f"population perturbations cover Linear and Embedding weights and 1-D weights that "
                                 f"broadcast over rows (norms); {type(module).__name__}.{name} {tuple(p.shape)} is "
                                 "neither: freeze it (requires_grad=False) or use MeZO")
        if outputs:
            self.outputs[id(module)] = outputs
        if swaps:
            x = args[0]
            per = self._blocks(x.shape[0], module)
            self.swapped[id(module)] = (module, [(name, p) for name, _, p in swaps])
            sign = torch.tensor([1.0, -1.0], device=x.device)
            for name, index, p in swaps:
                z, _ = self._stack(index, p)  # (pairs, d)
                w = (p.detach().float() + self.alpha * z.float()[:, None] * sign[None, :, None]).to(p.dtype)
                shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (p.shape[0],)
                module._parameters[name] = w.view(-1, p.shape[0]).repeat_interleave(per, 0).view(shape)

    def _post(self, module: torch.nn.Module, args, output):
        swapped = self.swapped.pop(id(module), None)
        if swapped is not None:
            module._parameters.update(swapped[1])
        outputs = self.outputs.pop(id(module), None)
        if not outputs or output is None:  # None: the module's forward raised
            return None
        pairs, x = len(self.seeds), args[0]
        self._blocks(x.shape[0], module)
        out = output.view(pairs, 2, -1, output.shape[-1])  # (pair, sign, rows of a member, features)
        sign = torch.tensor([1.0, -1.0], device=out.device, dtype=out.dtype).view(1, 2, 1, 1)
        scale = self.alpha / math.sqrt(self.opt.perturbation_rank)
        for name, index, p in outputs:
            a, b = self._stack(index, p)
            if name == "bias":
                out.add_(a[:, None, None, :] * sign, alpha=self.alpha)
            elif isinstance(module, torch.nn.Embedding):  # rows A_k[ids] @ B_k^T
                ids = x.reshape(pairs, -1)
                picked = torch.gather(a, 1, ids[..., None].expand(-1, -1, a.shape[-1]))  # (pairs, 2*rows, r)
                low = (picked.view(pairs, 2, -1, a.shape[-1]) * sign).view(pairs, -1, a.shape[-1])
                out.view(pairs, -1, out.shape[-1]).baddbmm_(low, b.transpose(1, 2), alpha=scale)
            else:  # x @ B_k, signed, @ A_k^T, added by the matmul itself (no output-sized temporary)
                low = torch.bmm(x.reshape(pairs, -1, x.shape[-1]), b)  # (pairs, 2*rows, r)
                low = (low.view(pairs, 2, -1, low.shape[-1]) * sign).view(pairs, -1, low.shape[-1])
                out.view(pairs, -1, out.shape[-1]).baddbmm_(low, a.transpose(1, 2), alpha=scale)
        return output


class Population(MeZO):
    """Evolution strategies with low-rank perturbations (EGGROLL, 2025), all members scored in one batched pass.

    ``step(closure)`` calls the closure once, with the weights perturbed per row block as the module docstring says;
    the closure returns one loss per member (:attr:`members` of them: all of ``population`` in one process, this
    rank's share under torchrun), for the batch repeated once per member with the rows grouped by member
    (:class:`PopulationObjective` does this for the objectives of this package). The model must be in ``eval()``.
    Settings as MeZO's (``eps`` is sigma, the perturbation scale), plus:

    Args:
        population: members per step, an even number (antithetic pairs); under torchrun a multiple of
            2 * world size.
        perturbation_rank: r, the rank of each member's perturbation of a matrix.
    """

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
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, n_perturbations=population // 2,
                         seed=seed, noise=noise, table_size=table_size, chunk_size=chunk_size, update=update,
                         fitness_shaping=fitness_shaping, on_nonfinite=on_nonfinite)
        self.population, self.perturbation_rank = population, perturbation_rank
        self.members = population // world
        self._reported = False

    def _factor_shape(self, p: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of A and B for a matrix (viewed as (shape[0], rest)); (n, 0) for a vector."""
        return (p.shape[0], p.numel() // p.shape[0]) if p.ndim >= 2 else (p.numel(), 0)

    def _factors(self, seed: int, index: int, p: torch.Tensor,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 (A (out, r), B (in, r)) of a matrix, (z (n, 1), None) of a vector: views of ``out`` (their values
        one after the other) when given."""
        (rows, cols), r = self._factor_shape(p), self.perturbation_rank
        values = torch.empty((rows + cols) * r if cols else rows, device=p.device) if out is None else out
        for where, z in self.noise.chunks(seed, index, values):
            values[where] = z
        if not cols:
            return values.view(rows, 1), None
        return values[: rows * r].view(rows, r), values[rows * r:].view(cols, r)

    def score(self, closure: Callable[[], Any], seeds: Sequence[int]) -> list[float]:
        """The closure's losses, one per member of the pairs ``seeds``, with no weight written."""
        with torch.no_grad(), _Members(self, seeds):
            losses = closure()
        losses = [float(v) for v in (losses.reshape(-1).tolist() if isinstance(losses, torch.Tensor) else losses)]
        if len(losses) != 2 * len(seeds):
            raise ValueError(f"the closure returned {len(losses)} losses for {2 * len(seeds)} members: it must "
                             "return one loss per member (PopulationObjective does)")
        return losses

    def step(self, closure: Callable[[], Any]) -> float:  # type: ignore[override]
        """Score the population, update; return the mean loss. A closure that raises leaves the weights as they were."""
        if closure is None:
            raise ValueError("Population.step needs a closure that returns one loss per member")
        seeds = [mix(self.seed, self.num_perturbations_done + k) for k in range(self.n_perturbations)]
        mine = seeds[distributed.rank() * self.members // 2:][: self.members // 2]  # this rank's pairs
        losses = exchange_losses(self.score(closure, mine))
        if not self._reported and distributed.world_size() > 1:
            self._reported = True
            if distributed.is_main():
                print(f"population: {exchange_bytes(self)} bytes sent per rank per step (a gradient all-reduce "
                      f"would send {allreduce_bytes(self)})", file=sys.stderr)
        pairs = list(zip(losses[0::2], losses[1::2]))
        grads = self._projected_grads(pairs)
        record = {"seeds": seeds, "grads": grads, "loss": sum(losses) / len(losses),
                  "lrs": [g["lr"] for g in self.param_groups]}
        if self.update == "normalized":
            record["grads"], record["second_moment"] = self._normalized(grads)
        self._apply(record)
        return record["loss"]

    @torch.no_grad()
    def _apply(self, record: dict) -> None:
        """The update, the only write: per block of a tensor's rows, ``rows.addmm_(A_stack, (B_stack * c).T)``
        with c_k = g_k / (pairs * sqrt(r)) (in an fp32 buffer, stochastically rounded, for half weights)."""
        seeds = record["seeds"]
        terms = [(seed, grad / len(seeds)) for seed, grad in zip(seeds, record["grads"]) if grad]
        with signals_deferred():
            for index, p, group in self._params():
                lr = group["lr"]
                wd = group["weight_decay"] if (p.ndim >= 2 or group["decay_1d"]) else 0.0
                if not lr or not (terms or wd):
                    continue
                matrix = p.detach().view(p.shape[0], -1) if p.ndim >= 2 else p.detach().view(-1, 1)
                a = b = None
                if terms:
                    factors = [self._factors(seed, index, p) for seed, _ in terms]
                    coeff = torch.tensor([c for _, c in terms], device=p.device)
                    if p.ndim >= 2:  # A (out, terms*r) @ (B (in, terms*r) * c).T
                        r = self.perturbation_rank
                        a = torch.cat([f[0] for f in factors], 1)
                        b = torch.cat([f[1] for f in factors], 1) * coeff.repeat_interleave(r) / math.sqrt(r)
                    else:  # z (n, terms) @ c (terms, 1)
                        a, b = torch.cat([f[0] for f in factors], 1), coeff[None, :]
                step_rows = max(1, self.noise.chunk_size // matrix.shape[1])
                for k, start in enumerate(range(0, matrix.shape[0], step_rows)):
                    rows = matrix[start:start + step_rows]
                    acc = rows.float() if p.dtype in HALF else rows
                    if wd:
                        acc.mul_(1.0 - lr * wd)
                    if a is not None:
                        acc.addmm_(a[start:start + step_rows].to(acc.dtype), b.T.to(acc.dtype), alpha=-lr)
                    if p.dtype in HALF:
                        flat = acc.view(-1)
                        bits = self.noise.rounding_bits(seeds[0], index, k, flat.numel(), acc.device)
                        round_stochastic(flat, bits, out=rows.view(-1))
            self.trajectory.append(record)
            self.num_perturbations_done += len(seeds)

    def config(self) -> dict:
        return {**super().config(), "population": self.population, "perturbation_rank": self.perturbation_rank}

    @classmethod
    def from_config(cls, params: Iterable, config: dict) -> Population:
        keys = ("eps", "population", "perturbation_rank", "seed", "update", "fitness_shaping", "noise", "table_size",
                "chunk_size")
        return cls(params, **{k: config[k] for k in keys})


def exchange_losses(losses: list[float]) -> list[float]:
    """Every rank's member losses, in member order, on every rank (one all_gather of float64 numbers; ``losses``
    in one process). A rank that stopped makes the others raise within EXCHANGE_TIMEOUT, naming it."""
    if distributed.world_size() == 1:
        return losses
    device = distributed._device()
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
    numel = sum(p.numel() for _, p, _ in opt._params())
    return int(2 * (world - 1) / world * numel * 4)


def replay(params: Iterable, state: dict, steps: int | None = None) -> MeZO:
    """Rebuild tuned weights from a ``Population`` or ``MeZO`` ``state_dict()`` (see optimizer.replay)."""
    population = isinstance(state, dict) and "population" in state.get("mezo", {})
    return replay_mezo(params, state, steps, estimator=Population if population else MeZO)


class _Shared:
    """One pass for all members: a predictor's passes (``_forward``, ``candidate_scores``, ``generate``) run on the
    arguments repeated once per member, rows grouped by member, and are split; each member reads its part."""

    PASSES = ("_forward", "candidate_scores", "generate")

    def __init__(self, predictor: Any, members: int):
        self.predictor, self.members = predictor, members
        self.shared = copy.copy(predictor)
        self.shared.members = members
        self.results: dict[tuple, list] = {}

    def view(self, member: int) -> Any:
        """The predictor as member ``member`` sees it."""
        view = copy.copy(self.predictor)
        for name in self.PASSES:
            if hasattr(view, name):
                setattr(view, name, self._pass(name, member))
        return view

    def _pass(self, name: str, member: int) -> Callable:
        def run(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            key = (name, repr(args), repr(sorted(kwargs.items())))
            if key not in self.results:
                n = self.members
                repeated = [a * n if isinstance(a, list | tuple) else a for a in args]
                out = getattr(type(self.predictor), name)(self.shared, model, *repeated, **kwargs)
                per = len(out) // n
                self.results[key] = [out[m * per:(m + 1) * per] for m in range(n)]
            return self.results[key][member]
        return run


PREDICTOR_FIELDS = ("predictor", "generator")


class PopulationObjective(Objective):
    """``objective`` scored for every member in one pass: returns one loss per member.

    ``members`` is the count (or a function returning it, e.g. ``lambda: optimizer.members``). The objective's
    predictor runs its passes once on the batch repeated once per member (rows grouped by member, as
    :class:`Population` expects); then the objective is computed for each member from that member's part, so
    any objective built on a predictor (metric, cross-entropy, reward, weighted sums of them) works unchanged.
    Generation decodes all members' completions in one ``generate`` call; sampled completions draw different
    random numbers per member (the rows of one call), not the same as MeZO's two sides share. Caches an
    objective keeps between calls (a batch's candidates) are those the first member built.
    """

    def __init__(self, objective: Any, members: int | Callable[[], int]):
        self.objective, self._members = objective, members
        self.name = getattr(objective, "name", type(objective).__name__)

    def __getattr__(self, name: str) -> Any:  # greater_is_better, last_means, ... of the wrapped objective
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)

    def __call__(self, model: torch.nn.Module, batch: Sequence[dict]) -> list[float]:
        n = self._members() if callable(self._members) else self._members
        shared: dict[int, _Shared] = {}
        return [float(self._member(self.objective, model, batch, n, m, shared)) for m in range(n)]

    def _member(self, objective: Any, model: torch.nn.Module, batch: Sequence[dict], n: int, m: int,
                shared: dict) -> float:
        terms = getattr(objective, "terms", None)
        if terms is not None:  # a WeightedSum
            return sum(w * self._member(o, model, batch, n, m, shared) for w, o in terms)
        field = next((f for f in PREDICTOR_FIELDS if hasattr(objective, f)), None)
        if field is None:
            raise TypeError(f"PopulationObjective needs an objective that scores through a predictor (metric, "
                            f"cross-entropy, reward); {type(objective).__name__} has none: write a closure that "
                            "returns one loss per member")
        predictor = getattr(objective, field)
        view = shared.setdefault(id(predictor), _Shared(predictor, n)).view(m)
        mine = copy.copy(objective)
        setattr(mine, field, view)
        loss = mine(model, batch)
        kept = {k: v for k, v in vars(mine).items() if k != field}
        vars(objective).update(kept)  # caches (a batch's candidates) and last_means: the next member reads them
        return loss

    def __repr__(self) -> str:
        return f"PopulationObjective({self.objective!r})"
