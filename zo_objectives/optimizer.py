"""MeZO: the seeded, in-place zeroth-order (SPSA) optimizer, and replay of its trajectory.

One step per perturbation k: draw a seed, move every trainable weight to x + eps*z, score, move to
x - eps*z, score, then restore and update in one fused pass: x <- x + eps*z - lr*(g*z + wd*x) with
g = (loss_plus - loss_minus) / (2*eps). The noise z is never stored: it is regenerated from
(seed, tensor index, chunk). Three passes over the weights per perturbation, two closure calls.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.optim import Optimizer

MASK64 = (1 << 64) - 1
NOISE_KINDS = ("table", "gaussian", "rademacher")
NONFINITE_POLICIES = ("raise", "skip")
DIFFERENCES = ("central", "forward")
UPDATES = ("sgd", "sign", "normalized")
RMS_BETA = 0.99  # decay of the running mean square that "normalized" updates divide by
SHAPINGS = ("none", "rank")
SCHEDULES = ("constant", "linear", "cosine")


def mix(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 finalizer), stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & MASK64
        h ^= h >> 31
    return h >> 1


class Noise:
    """Regenerates z for (seed, tensor index) in bounded chunks, never allocating a weight-sized buffer.

    ``table``: slices of one seeded, standardized Gaussian vector of ``table_size`` values at offsets hashed
    from (seed, tensor, chunk), as in Salimans et al. (2017): a memory-bound read instead of a random draw.
    ``gaussian``: exact N(0, 1) per chunk from a private ``torch.Generator``. ``rademacher``: +-1 likewise.
    """

    def __init__(self, kind: str = "table", table_size: int = 1 << 22, table_seed: int = 0,
                 chunk_size: int = 1 << 18):
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise {kind!r}; accepted: {', '.join(NOISE_KINDS)}")
        if kind == "table" and table_size < 2 * chunk_size:
            raise ValueError(f"noise table_size must be at least 2 * chunk_size = {2 * chunk_size}")
        self.kind, self.table_size, self.table_seed, self.chunk_size = kind, table_size, table_seed, chunk_size
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._tables:
            gen = torch.Generator().manual_seed(self.table_seed)
            table = torch.randn(self.table_size, generator=gen)
            mean, std = table.double().mean().item(), table.double().std().item()
            table.sub_(mean).div_(std)  # exactly standardized, built in place: no temporary copies
            self._tables[key] = table.to(device=device, dtype=dtype)
        return self._tables[key]

    def chunks(self, seed: int, index: int, flat: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (slice of ``flat``, z for that slice); the same arguments always yield the same z."""
        n, c = flat.numel(), self.chunk_size
        if self.kind == "table":
            table = self._table(flat.device, flat.dtype)
            for k, start in enumerate(range(0, n, c)):
                length = min(c, n - start)
                offset = mix(seed, index, k) % (self.table_size - length + 1)
                yield slice(start, start + length), table[offset:offset + length]
            return
        key = (flat.device, flat.dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(c, device=flat.device, dtype=flat.dtype)
        gen = torch.Generator(device=flat.device).manual_seed(mix(seed, index))
        for start in range(0, n, c):
            z = self._buffers[key][: min(c, n - start)]
            if self.kind == "gaussian":
                z.normal_(generator=gen)
            else:
                z.random_(0, 2, generator=gen).mul_(2).sub_(1)
            yield slice(start, start + z.numel()), z

    def config(self) -> dict:
        return {"noise": self.kind, "table_size": self.table_size, "table_seed": self.table_seed,
                "chunk_size": self.chunk_size}


class MeZO(Optimizer):
    """Memory-efficient zeroth-order SGD (Malladi et al., 2023) as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or param groups, as for any torch optimizer. Groups may set ``lr``,
            ``weight_decay`` and ``decay_1d`` (decay tensors with one dimension: biases and norm weights;
            off by default, as in MeZO).
        lr: learning rate. eps: perturbation scale (one value for all groups).
        weight_decay: decoupled weight decay. n_perturbations: SPSA estimates averaged per step.
        seed: seeds the stream of step seeds. noise: "table" (default), "gaussian" or "rademacher".
        difference: "central" (two closure calls at x +- eps z) or "forward" (x and x + eps z: one pass
            over the weights fewer; the first loss is the loss at x).
        update: "sgd" (move by g), "sign" (move by sign(g)) or "normalized" (move by g divided by the
            running root mean square of the estimates so far, bias-corrected as in Adam: the step length no
            longer depends on the scale of the loss, so one lr suits objectives on different scales).
        fitness_shaping: "none" or "rank": replace the 2n losses of a step by their centered ranks (as
            evolution strategies do), robust to the scale and outliers of a reward; retune lr with it.
        momentum, momentum_window: heavy-ball momentum without a buffer: each step also moves by
            momentum**lag times the estimates of the previous ``momentum_window - 1`` steps, regenerated
            from their seeds (one extra pass over the weights per past estimate).
        on_nonfinite: "raise" or "skip" (warn and leave the weights unchanged) on a NaN/inf loss.
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_perturbations: int = 1, seed: int = 0, noise: str = "table", table_size: int = 1 << 22,
                 difference: str = "central", update: str = "sgd", fitness_shaping: str = "none",
                 momentum: float = 0.0, momentum_window: int = 0, on_nonfinite: str = "raise"):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not (isinstance(n_perturbations, int) and n_perturbations >= 1):
            raise ValueError(f"n_perturbations must be an int >= 1, got {n_perturbations!r}")
        if not 0.0 <= momentum < 1.0 or momentum_window < 0 or (momentum > 0) != (momentum_window > 1):
            raise ValueError(f"momentum must be in [0, 1) with momentum_window > 1 (or 0 and 0), got {momentum}, "
                             f"{momentum_window}")
        for name, value, accepted in (("difference", difference, DIFFERENCES), ("update", update, UPDATES),
                                      ("fitness_shaping", fitness_shaping, SHAPINGS),
                                      ("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)):
            if value not in accepted:
                raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, decay_1d=False))
        self.eps, self.n_perturbations, self.seed = eps, n_perturbations, seed
        self.difference, self.update, self.on_nonfinite = difference, update, on_nonfinite
        self.fitness_shaping, self.momentum, self.momentum_window = fitness_shaping, momentum, momentum_window
        self.noise = Noise(noise, table_size=table_size, table_seed=seed)
        self.num_perturbations_done = 0
        self.trajectory: list[dict] = []
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_contiguous():
                    raise ValueError("MeZO needs contiguous parameters; call .contiguous() on the model first")

    def _params(self) -> Iterator[tuple[int, torch.Tensor, dict]]:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield index, p, group
                index += 1

    @torch.no_grad()
    def _move(self, seed: int, scale: float, grad: float | None = None, lr_scale: float = 1.0) -> None:
        """One pass over the weights: x += scale*eps*z, then, if ``grad`` is given, - lr*(grad*z + wd*x)."""
        for index, p, group in self._params():
            flat = p.data.view(-1)
            wd = group["weight_decay"] if (p.ndim >= 2 or group["decay_1d"]) else 0.0
            alpha = scale * self.eps
            if grad is not None:
                alpha -= group["lr"] * lr_scale * grad
                if wd:
                    flat.mul_(1.0 - group["lr"] * lr_scale * wd)
            for where, z in self.noise.chunks(seed, index, flat):
                flat[where].add_(z, alpha=alpha)

    def _score(self, closure: Callable[[], float]) -> float:
        with torch.no_grad():
            loss = closure()
        return float(loss)

    def step(self, closure: Callable[[], float | torch.Tensor]) -> float:  # type: ignore[override]
        """Run ``n_perturbations`` SPSA estimates and update; return the mean loss seen.

        If the closure raises (KeyboardInterrupt included) or a loss is not finite, the weights are put back
        to where the step found them before the exception propagates, and the step's seeds are not used up.
        """
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss to minimize")
        n = self.n_perturbations
        seeds = [mix(self.seed, self.num_perturbations_done + k) for k in range(n)]
        pairs: list[tuple[float, float]] = []
        pending: tuple[int, float] = (0, 0.0)  # (seed, multiple of eps*z) the weights are away from x
        try:
            for seed in seeds:
                if pending[1]:
                    self._move(pending[0], -pending[1])
                    pending = (seed, 0.0)
                if self.difference == "forward":
                    minus = self._score(closure)
                    self._move(seed, 1.0)
                    pending = (seed, 1.0)
                    plus = self._score(closure)
                else:
                    self._move(seed, 1.0)
                    pending = (seed, 1.0)
                    plus = self._score(closure)
                    self._move(seed, -2.0)
                    pending = (seed, -1.0)
                    minus = self._score(closure)
                pairs.append((plus, minus))
            grads = self._projected_grads(pairs)
        except BaseException:
            if pending[1]:
                self._move(pending[0], -pending[1])
            raise
        self.num_perturbations_done += n
        record = {"seeds": seeds, "grads": grads, "loss": sum(map(sum, pairs)) / (2 * n),
                  "lrs": [g["lr"] for g in self.param_groups]}
        if self.update == "normalized":
            record["grads"], record["second_moment"] = self._normalized(grads)
        self._update(record, restore=pending[1])
        self.trajectory.append(record)
        return record["loss"]

    def _update(self, record: dict, restore: float) -> None:
        """Move the weights by the record's estimates (the last one fused with undoing its ``restore``
        perturbation), then by the momentum terms regenerated from the previous records' seeds."""
        n = len(record["seeds"])
        *rest, (seed, grad) = zip(record["seeds"], record["grads"])
        self._move(seed, -restore, grad, 1.0 / n)
        for seed, grad in rest:
            if grad is not None:
                self._move(seed, 0.0, grad, 1.0 / n)
        for lag in range(1, self.momentum_window):
            if lag > len(self.trajectory):
                break
            past = self.trajectory[-lag]
            for seed, grad in zip(past["seeds"], past["grads"]):
                if grad is not None:
                    self._move(seed, 0.0, self.momentum**lag * grad, 1.0 / len(past["seeds"]))

    def _projected_grads(self, pairs: list[tuple[float, float]]) -> list[float | None]:
        """(plus - minus) / (2 eps) per perturbation (eps for forward differences); ranks when shaping."""
        scale = self.eps if self.difference == "forward" else 2 * self.eps
        for plus, minus in pairs:
            if not (math.isfinite(plus) and math.isfinite(minus)):
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(f"non-finite loss (plus={plus}, minus={minus}); weights restored. "
                                             "Pass on_nonfinite='skip' to skip such estimates")
                warnings.warn(f"skipping an estimate with non-finite loss (plus={plus}, minus={minus})",
                              stacklevel=3)
        if self.fitness_shaping == "rank":
            ranked = sorted(v for pair in pairs for v in pair if math.isfinite(v))
            top = max(1, len(ranked) - 1)

            def utility(v: float) -> float:  # centered rank in [-0.5, 0.5]; ties share their mean rank
                if not math.isfinite(v):
                    return v
                return (bisect.bisect_left(ranked, v) + bisect.bisect_right(ranked, v) - 1) / (2 * top) - 0.5

            pairs = [(utility(p), utility(m)) for p, m in pairs]
        grads: list[float | None] = []
        for plus, minus in pairs:
            grad = (plus - minus) / scale
            if not math.isfinite(grad):
                grads.append(None)
            elif self.update == "sign":
                grads.append(math.copysign(1.0, grad) if grad else 0.0)
            else:
                grads.append(grad)
        return grads

    def _normalized(self, grads: list[float | None]) -> tuple[list[float | None], list]:
        """Each estimate divided by the bias-corrected running RMS of all estimates up to it, and the new
        [mean square, count]; the previous ones are the last trajectory record's (so resume and replay,
        which restore the trajectory, restore them too)."""
        mean_square, count = self.trajectory[-1]["second_moment"] if self.trajectory else (0.0, 0)
        out: list[float | None] = []
        for grad in grads:
            if grad is None:
                out.append(None)
                continue
            count += 1
            mean_square = RMS_BETA * mean_square + (1.0 - RMS_BETA) * grad * grad
            rms = math.sqrt(mean_square / (1.0 - RMS_BETA**count))
            out.append(grad / rms if rms > 0 else 0.0)
        return out, [mean_square, count]

    def config(self) -> dict:
        """Everything besides the weights and the trajectory that a replay needs."""
        return {"eps": self.eps, "n_perturbations": self.n_perturbations, "seed": self.seed,
                "difference": self.difference, "update": self.update, "fitness_shaping": self.fitness_shaping,
                "momentum": self.momentum, "momentum_window": self.momentum_window, **self.noise.config()}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mezo"] = {**self.config(), "num_perturbations_done": self.num_perturbations_done,
                         "trajectory": [dict(r) for r in self.trajectory]}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        mezo = state_dict.pop("mezo")
        mismatched = {k: (v, mezo[k]) for k, v in self.config().items() if mezo.get(k) != v}
        if mismatched:
            raise ValueError(f"optimizer settings differ from the checkpoint's (now, saved): {mismatched}")
        super().load_state_dict(state_dict)
        self.num_perturbations_done = mezo["num_perturbations_done"]
        self.trajectory = [dict(r) for r in mezo["trajectory"]]

    @torch.no_grad()
    def replay_record(self, record: dict) -> None:
        """Apply one trajectory record to the weights with the same arithmetic as training (bitwise)."""
        for group, lr in zip(self.param_groups, record["lrs"]):
            group["lr"] = lr
        forward = self.difference == "forward"
        for k, seed in enumerate(record["seeds"]):
            self._move(seed, 1.0)
            if not forward:
                self._move(seed, -2.0)
            if k < len(record["seeds"]) - 1:
                self._move(seed, -1.0 if forward else 1.0)
        self._update(record, restore=1.0 if forward else -1.0)
        self.trajectory.append(dict(record))
        self.num_perturbations_done += len(record["seeds"])


def replay(params: Iterable, state: dict, steps: int | None = None) -> MeZO:
    """Rebuild tuned weights in place from the base weights and a ``MeZO.state_dict()`` (or its trajectory).

    ``params`` must be the same parameters (same order, same groups) the optimizer was built with, holding
    the base weights. Returns an optimizer positioned after the replayed steps, ready to continue training.
    """
    mezo = state["mezo"]
    keys = ("eps", "n_perturbations", "seed", "difference", "update", "fitness_shaping", "momentum", "momentum_window")
    config = {k: mezo[k] for k in keys}
    opt = MeZO(params, noise=mezo["noise"], table_size=mezo["table_size"], **config)
    if "param_groups" in state:
        for group, saved in zip(opt.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    for record in mezo["trajectory"][:steps]:
        opt.replay_record(record)
    return opt


def make_scheduler(optimizer: Optimizer, kind: str, total_steps: int,
                   last_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A constant, linear-decay or cosine-decay learning-rate schedule over ``total_steps``."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; accepted: {', '.join(SCHEDULES)}")
    shapes = {"constant": lambda t: 1.0, "linear": lambda t: 1.0 - t,
              "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t))}
    shape = shapes[kind]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: shape(min(step, total_steps) / total_steps))
    with warnings.catch_warnings():  # fast-forwarding a resumed run steps the schedule before the optimizer
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(last_step):
            scheduler.step()
    return scheduler
