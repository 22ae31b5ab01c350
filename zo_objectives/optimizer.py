"""MeZO: the seeded zeroth-order (SPSA) estimator as a ``torch.optim.Optimizer``, exact in every dtype.

One step per perturbation k: draw a seed, score the loss at x + eps*z and at x - eps*z, and move
x <- x - lr*(g*z + wd*x) with g = (loss_plus - loss_minus) / (2*eps). The noise z is never stored: it is
regenerated from (seed, tensor index, chunk) (:mod:`zo_objectives.noise`). The stored weights are never perturbed:
the closure's forward passes see them perturbed through module hooks (:mod:`zo_objectives.perturb`), so a closure
that raises, a NaN or a KeyboardInterrupt leaves them bitwise as they were. The only write is the update, which
:class:`~zo_objectives.population.Population` shares; ``state_dict()`` holds the trajectory that
:func:`zo_objectives.replay.replay` rebuilds the weights from.
"""

from __future__ import annotations

import bisect
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch.optim import Optimizer

from zo_objectives import fused
from zo_objectives.noise import HALF, Noise, _eager_update, chunk_update, mix
from zo_objectives.perturb import _Layout, _Perturbed

NONFINITE_POLICIES = ("raise", "skip")
DIFFERENCES = ("central", "forward")
UPDATES = ("sgd", "sign", "normalized")
RMS_BETA = 0.99  # decay of the running mean square that "normalized" updates divide by
SHAPINGS = ("none", "rank")
SCHEDULES = ("constant", "linear", "cosine")


_STEP: ContextVar[tuple[int, int] | None] = ContextVar("zo_objectives_step", default=None)


def current_step() -> tuple[int, int] | None:
    """(seed, index) of the MeZO step whose closure is running, None outside one. An objective keys by it what it
    keeps for one step (a reward's sampled candidates), and sampling draws new numbers each step; the index is
    the number of steps before (a resumed run replays its trajectory, so it counts on where it stopped)."""
    return _STEP.get()


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends (main thread only), so an update is never half applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda num, frame: caught.append(num)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)


class MeZO(Optimizer):
    """Memory-efficient zeroth-order SGD (Malladi et al., 2023) as a ``torch.optim.Optimizer``.

    Differs from a gradient optimizer: ``step(closure)`` calls the closure 2 * ``n_perturbations`` times
    without gradients, and the closure must compute the loss through the modules' forward (the perturbed
    weights exist only there; a tensor read directly is the unperturbed one). Put the model in ``eval()``
    mode. ``state_dict()`` holds the trajectory; ``load_state_dict`` does not move the weights: use
    :func:`~zo_objectives.replay.replay` on the base weights.

    Args:
        params: parameters or param groups, as for any torch optimizer. Groups may set ``lr``,
            ``weight_decay`` and ``decay_1d`` (decay tensors with one dimension: biases and norm weights;
            off by default, as in MeZO).
        lr: learning rate. eps: perturbation scale (one value for all groups); for a bf16 model 3e-3, where
            the rounding of a forward pass swamps the loss differences of smaller ones (docs/half_precision.md).
        weight_decay: decoupled weight decay. n_perturbations: SPSA estimates averaged per step.
        seed: seeds the stream of step seeds. noise: "table" (default), "gaussian" or "rademacher".
        table_size, chunk_size: values in the noise table, and elements per chunk of every pass over a tensor
            (the bound on its buffers). Default 2^22 and 2^18, or 2^25 and 2^24 when the parameters are on a GPU,
            where each chunk's kernel launches dominate (a 1.1B model's step: 2.8 x two forward passes instead of
            18.5, BENCHMARKS.md). A checkpoint keeps them, so replay draws the same noise on any device.
        difference: "central" (losses at x +- eps z) or "forward" (x and x + eps z).
        update: "sgd" (move by g), "sign" (experimental: move by sign(g)) or "normalized" (move by g divided by
            the running root mean square of the estimates so far, bias-corrected as in Adam: the step length no
            longer depends on the scale of the loss, so one lr suits objectives on different scales).
        fitness_shaping: "none" or "rank" (experimental): replace the 2n losses of a step by their centered
            ranks (as evolution strategies do), robust to the scale and outliers of a reward. The estimate is
            then the rank difference itself, in [-1, 1], not divided by eps: scale-free like ``update="sign"``,
            so the lr is the largest step (zo-tune's default for it: 1e-4, as for sign and normalized updates).
        momentum, momentum_window: (experimental) heavy-ball momentum without a buffer: each step also moves by
            momentum**lag times the estimates of the previous ``momentum_window - 1`` steps, regenerated from
            their seeds.
        on_nonfinite: "raise" or "skip" (warn and leave the weights unchanged) on a NaN/inf loss.
    """

    def __init__(self, params: Iterable, *, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_perturbations: int = 1, seed: int = 0, noise: str = "table", table_size: int | None = None,
                 chunk_size: int | None = None, difference: str = "central", update: str = "sgd",
                 fitness_shaping: str = "none", momentum: float = 0.0, momentum_window: int = 0,
                 on_nonfinite: str = "raise"):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("momentum", momentum)):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
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
        # Each chunk of a pass costs a few kernel launches: on a GPU, fewer and larger chunks (and a table to match)
        on_gpu = any(p.is_cuda for group in self.param_groups for p in group["params"])
        self.noise = Noise(noise, table_size=table_size or (1 << 25 if on_gpu else 1 << 22), table_seed=seed,
                           chunk_size=chunk_size or (1 << 24 if on_gpu else 1 << 18))
        self.num_perturbations_done = 0
        self.trajectory: list[dict] = []
        self._warned_training = self._warned_unused = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.is_contiguous():
                raise ValueError("MeZO needs contiguous parameters; call .contiguous() on the model first")

    def _params(self) -> Iterator[tuple[int, torch.Tensor, dict]]:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield index, p, group
                index += 1

    def _score(self, closure: Callable[[], float], seed: int, scale: float | None,
               layout: _Layout | None = None) -> float:
        """The closure's loss, with the weights perturbed by scale*eps*z inside every forward (none if None);
        ``layout``: the step's (see :class:`_Layout`)."""
        with torch.no_grad():
            if scale is None:
                return float(closure())
            with _Perturbed(self, seed, scale, layout) as perturbed:
                loss = float(closure())
        missed = len(perturbed.targets) - len(perturbed.seen)
        if perturbed.seen and missed and not self._warned_unused:
            self._warned_unused = True
            warnings.warn(f"MeZO: {missed} of {len(perturbed.targets)} trainable tensors were not used by any "
                          "module's forward in the closure (unused, or read directly): their estimates are noise. "
                          "Freeze them, or compute the loss through the model's forward", stacklevel=3)
        return loss

    def step(self, closure: Callable[[], float | torch.Tensor]) -> float:  # type: ignore[override]
        """Run ``n_perturbations`` SPSA estimates and update; return the mean loss seen.

        The weights are written only by the final update, so a closure that raises (KeyboardInterrupt
        included) or a non-finite loss leaves them bitwise unchanged, and the step's seeds are not used up.
        """
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss to minimize")
        seeds = self._seeds()
        pairs: list[tuple[float, float]] = []
        layout = self._layout()
        with self._in_step():
            for seed in seeds:
                if self.difference == "forward":
                    minus = self._score(closure, seed, None)
                    plus = self._score(closure, seed, 1.0, layout)
                else:
                    plus = self._score(closure, seed, 1.0, layout)
                    minus = self._score(closure, seed, -1.0, layout)
                pairs.append((plus, minus))
        return self._update(seeds, pairs, sum(map(sum, pairs)) / (2 * len(seeds)), layout.z)

    def _layout(self) -> _Layout:
        """Where the step's closure calls find each module's work: the last step's layout while it still fits the
        trainable tensors and the modules (walking the modules again each step costs as much as a layer's add)."""
        layout = getattr(self, "_layout_kept", None)
        if layout is None or not layout.fits(self):
            layout = self._layout_kept = _Layout(self)
        else:
            layout.new_step()
        return layout

    @contextmanager
    def _in_step(self) -> Iterator[None]:
        """While the step's closure calls run: :func:`current_step` says which step it is."""
        token = _STEP.set((self.seed, len(self.trajectory)))
        try:
            yield
        finally:
            _STEP.reset(token)

    def _seeds(self) -> list[int]:
        """The seeds of the step's ``n_perturbations`` estimates: the next ones of the stream."""
        return [mix(self.seed, self.num_perturbations_done + k) for k in range(self.n_perturbations)]

    def _update(self, seeds: list[int], pairs: list[tuple[float, float]], loss: float,
                kept: dict[tuple[int, int], torch.Tensor] | None = None) -> float:
        """Update from the (plus, minus) losses of the estimates ``seeds``; return ``loss``, the step's mean.
        ``kept``: z already made by the step's closure calls, (seed, index) -> z (see :meth:`_move`)."""
        grads = self._projected_grads(pairs)
        record = {"seeds": seeds, "grads": grads, "loss": loss, "lrs": [g["lr"] for g in self.param_groups]}
        if self.update == "normalized":
            record["grads"], record["second_moment"] = self._normalized(grads)
        self._apply(record, kept)
        return record["loss"]

    def _terms(self, record: dict) -> list[tuple[int, float]]:
        """(seed, multiple of -lr*z) of every move a record makes: its estimates and the momentum terms
        regenerated from the previous records."""
        records = [(1.0, record)] + [(self.momentum**lag, self.trajectory[-lag])
                                     for lag in range(1, min(self.momentum_window, len(self.trajectory) + 1))]
        return [(seed, weight * grad / len(r["seeds"])) for weight, r in records
                for seed, grad in zip(r["seeds"], r["grads"]) if grad]

    @torch.no_grad()
    def _apply(self, record: dict, kept: dict[tuple[int, int], torch.Tensor] | None = None) -> None:
        """The update, the only write to the weights, whole or not at all (signals wait for it): every tensor that
        moves (a learning rate, and terms or weight decay) by :meth:`_move`; then the record is kept."""
        terms = self._terms(record)
        with signals_deferred():
            moving = []
            for index, p, group in self._params():
                lr = group["lr"]
                wd = group["weight_decay"] if (p.ndim >= 2 or group["decay_1d"]) else 0.0
                if lr and (terms or wd):  # else nothing moves: the weights stay bitwise as they are
                    moving.append((index, p, lr, wd))
            self._move(moving, terms, record["seeds"][0], kept or {})
            self.trajectory.append(record)
            self.num_perturbations_done += len(record["seeds"])

    def _move(self, moving: list[tuple[int, torch.Tensor, float, float]], terms: list[tuple[int, float]],
              seed: int, kept: dict[tuple[int, int], torch.Tensor]) -> None:
        """x <- x * (1 - lr*wd) - lr * sum(coeff * z) for each (index, tensor, lr, wd) of ``moving`` and the
        (seed, coeff) ``terms``: one pass per tensor, all terms summed in the weight's precision (fp32 for
        half-precision weights, then stochastically rounded with bits from ``seed``: :func:`chunk_update`).
        ``kept``: (seed, index) -> z of a one-chunk tensor (a table view shaped like it), made by the step's closure
        calls: the same z, not made again."""
        buffers: dict[torch.device, torch.Tensor] = {}  # one fp32 chunk per device for half-precision weights
        batches: dict[tuple, list[tuple[int, torch.Tensor]]] = {}  # (device, lr, wd) -> one-chunk tensors
        c, table = self.noise.chunk_size, self.noise.kind == "table"
        for index, p, lr, wd in moving:
            half = p.dtype in HALF
            if table and not half and 0 < p.numel() <= c:
                batches.setdefault((p.device, lr, wd), []).append((index, p))
                continue
            flat = p.detach().view(-1)
            if half and p.device not in buffers:
                size = min(c, max(q.numel() for _, q, _ in self._params()))
                buffers[p.device] = torch.empty(size, device=p.device, dtype=torch.float32)
            # z as fp32 values on the CPU, where adding a half tensor to an fp32 one is a slow mixed-dtype
            # kernel; on a GPU reading half the bytes is faster and the sum is the same
            wide = half and flat.device.type == "cpu"
            streams = [self.noise.chunks(term_seed, index, flat, wide=wide) for term_seed, _ in terms]
            decay = 1.0 - lr * wd if wd else 1.0
            for k, start in enumerate(range(0, flat.numel(), c)):
                chunk, zs = flat[start:start + c], [next(stream)[1] for stream in streams]
                bits = self.noise.rounding_bits(seed, index, k, chunk.numel(), chunk.device) if half else None
                if half and len(zs) == 1 and flat.is_cuda:  # one kernel in place of five, the same values
                    if fused.update(chunk, zs[0], bits, decay, -lr * terms[0][1], _eager_update):
                        continue
                with chunk_update(chunk, decay, bits, buffers.get(p.device)) as acc:
                    for z, (_, coeff) in zip(zs, terms):
                        acc.add_(z, alpha=-lr * coeff)
        # small tensors (z a view of the table): each operation above over all of them at once, in the same
        # order per tensor, so the same values
        for (_, lr, wd), items in batches.items():
            weights = [p for _, p in items]
            if wd:
                torch._foreach_mul_(weights, 1.0 - lr * wd)
            for term_seed, coeff in terms:
                zs = [kept.get((term_seed, index)) for index, _ in items]
                zs = [self.noise.one_chunk(term_seed, index, p) if z is None else z for z, (index, p) in zip(zs, items)]
                torch._foreach_add_(weights, zs, alpha=-lr * coeff)

    def _projected_grads(self, pairs: list[tuple[float, float]]) -> list[float | None]:
        """(plus - minus) / (2 eps) per perturbation (eps for forward differences); when shaping, the difference
        of the centered ranks (in [-1, 1]: ranks have no scale for eps to divide)."""
        scale = 1.0 if self.fitness_shaping == "rank" else self.eps if self.difference == "forward" else 2 * self.eps
        for plus, minus in pairs:
            if not (math.isfinite(plus) and math.isfinite(minus)):
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(f"non-finite loss (plus={plus}, minus={minus}); the weights are "
                                             "unchanged. Pass on_nonfinite='skip' (CLI: --on-nonfinite skip) to "
                                             "skip such estimates")
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

    @classmethod
    def from_config(cls, params: Iterable, config: dict) -> MeZO:
        """An optimizer over ``params`` with the settings of :meth:`config` (as a state_dict holds them)."""
        keys = ("eps", "n_perturbations", "seed", "difference", "update", "fitness_shaping", "momentum",
                "momentum_window", "noise", "table_size", "chunk_size")
        return cls(params, **{k: config[k] for k in keys})

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mezo"] = {**self.config(), "num_perturbations_done": self.num_perturbations_done,
                         "params": describe_params(p for group in self.param_groups for p in group["params"]),
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

    def replay_record(self, record: dict) -> None:
        """Apply one trajectory record to the weights with the same arithmetic as training (bitwise)."""
        for group, lr in zip(self.param_groups, record["lrs"]):
            group["lr"] = lr
        self._apply(dict(record))


def describe_params(params: Iterable[torch.Tensor]) -> list[list]:
    """[dtype, shape] of each parameter: what replay checks the parameters it is given against."""
    return [[str(p.dtype).removeprefix("torch."), list(p.shape)] for p in params]


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
