"""The shared core of every estimator, and the registry that names them.

An estimator is a ``torch.optim.Optimizer`` whose ``step(closure)`` scores the objective under seeded
perturbations and moves the weights along the same regenerated noise. What every estimator shares lives here, in
:class:`Estimator`: the stream of seeds, the trajectory (one record per step: the seeds, the coefficient of each
seed's noise, the learning rates), the update (the only write to the weights, whole or not at all, computed in fp32
and stochastically rounded for bf16/fp16 weights: :func:`~zo_objectives.noise.chunk_update`), ``state_dict()`` and
``replay_record``, which replays a record with the training arithmetic (bitwise). A subclass adds how a step scores
and what coefficient each seed gets (:mod:`.mezo`, :mod:`.population`), and registers itself by name
(:func:`register_estimator`), so a new estimator is one file.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from zo_objectives import fused
from zo_objectives.noise import HALF, Noise, chunk_update, eager_update, mix
from zo_objectives.step import in_step

NONFINITE_POLICIES = ("raise", "skip")
UPDATES = ("sgd", "sign", "normalized")
RMS_BETA = 0.99  # decay of the running mean square that "normalized" updates divide by
SHAPINGS = ("none", "rank")
NOISE_FIELDS = ("noise", "table_size", "chunk_size")  # the Noise settings a state holds (table_seed is the seed)

ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(name: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator: register an :class:`Estimator` subclass under ``name`` (``--estimator NAME``, and the name
    its ``state_dict()`` carries, by which :func:`estimator_from_state` finds it again)."""
    def register(cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"register_estimator({name!r}) takes an Estimator subclass, got {cls!r}")
        if ESTIMATORS.get(name, cls).__qualname__ != cls.__qualname__:
            raise ValueError(f"estimator {name!r} is already registered ({ESTIMATORS[name].__qualname__})")
        ESTIMATORS[name] = cls
        cls.name = name
        return cls
    return register


def list_estimators() -> list[str]:
    return sorted(ESTIMATORS)


def get_estimator(name: str) -> type[Estimator]:
    """The estimator class registered as ``name``; a ValueError naming the accepted ones otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; accepted: {', '.join(list_estimators())}")
    return ESTIMATORS[name]


def estimator_from_state(state: dict) -> type[Estimator]:
    """The class of the estimator whose ``state_dict()`` this is (states written before estimators carried their
    name: a Population's by its ``population`` setting, else MeZO)."""
    if not (isinstance(state, dict) and isinstance(state.get("mezo"), dict)):
        raise TypeError("need an estimator's state_dict(), as MeZO.state_dict() returns (a dict with a 'mezo' "
                        f"entry: the settings and the trajectory), got {type(state).__name__}")
    saved = state["mezo"]
    return get_estimator(saved.get("estimator") or ("population" if "population" in saved else "mezo"))


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


class Estimator(Optimizer):
    """The shared core: seeds, trajectory, update, ``state_dict()``. Subclasses implement ``step(closure)``, which
    scores the perturbations of ``self.next_seeds(n)`` inside ``with self.in_step():`` and ends with
    ``self.commit(seeds, coefficients, loss)``; a coefficient g_k moves the weights by ``-lr * g_k * z_k / n``.

    Args:
        params: parameters or param groups, as for any torch optimizer. Groups may set ``lr``,
            ``weight_decay`` and ``decay_1d`` (decay tensors with one dimension: biases and norm weights;
            off by default, as in MeZO).
        lr: learning rate. eps: perturbation scale (one value for all groups).
        weight_decay: decoupled weight decay. seed: seeds the stream of step seeds.
        noise: "table" (default), "gaussian" or "rademacher".
        table_size, chunk_size: values in the noise table, and elements per chunk of every pass over a tensor
            (the bound on its buffers). Default 2^22 and 2^18, or 2^25 and 2^24 when the parameters are on a GPU,
            where each chunk's kernel launches dominate. A checkpoint keeps them, so replay draws the same noise on
            any device.
        update: "sgd" (move by g), "sign" (experimental: move by sign(g)) or "normalized" (move by g divided by
            the running root mean square of the estimates so far, bias-corrected as in Adam: the step length no
            longer depends on the scale of the loss, so one lr suits objectives on different scales).
        fitness_shaping: "none" or "rank" (experimental): replace the losses of a step by their centered
            ranks (as evolution strategies do), robust to the scale and outliers of a reward. The estimate is
            then the rank difference itself, in [-1, 1], not divided by eps.
        momentum, momentum_window: (experimental) heavy-ball momentum without a buffer: each step also moves by
            momentum**lag times the estimates of the previous ``momentum_window - 1`` steps, regenerated from
            their seeds.
        on_nonfinite: "raise" or "skip" (warn and leave the weights unchanged) on a NaN/inf loss.
    """

    name: ClassVar[str] = ""  # set by register_estimator
    # the keyword arguments config() stores and from_config() passes back (besides the noise's)
    settings: ClassVar[tuple[str, ...]] = ("eps", "seed", "update", "fitness_shaping")
    members: int | None = None  # set when the closure must return one loss per member (a batched population)
    difference = "central"  # how a pair of losses makes an estimate (MeZO may score x and x + eps z instead)
    # an estimator whose step is lr / eps times a normalized estimate (its length does not follow the loss's scale):
    # its default lr is step_length x eps, so that another eps (bf16's) keeps the measured step
    step_length: ClassVar[float | None] = None

    def __init__(self, params: Iterable, *, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0, noise: str = "table", table_size: int | None = None, chunk_size: int | None = None,
                 update: str = "sgd", fitness_shaping: str = "none", momentum: float = 0.0, momentum_window: int = 0,
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
        if not 0.0 <= momentum < 1.0 or momentum_window < 0 or (momentum > 0) != (momentum_window > 1):
            raise ValueError(f"momentum must be in [0, 1) with momentum_window > 1 (or 0 and 0), got {momentum}, "
                             f"{momentum_window}")
        for name, value, accepted in (("update", update, UPDATES), ("fitness_shaping", fitness_shaping, SHAPINGS),
                                      ("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)):
            if value not in accepted:
                raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, decay_1d=False))
        self.eps, self.seed, self.update, self.on_nonfinite = eps, seed, update, on_nonfinite
        self.fitness_shaping, self.momentum, self.momentum_window = fitness_shaping, momentum, momentum_window
        # Each chunk of a pass costs a few kernel launches: on a GPU, fewer and larger chunks (and a table to match)
        on_gpu = any(p.is_cuda for group in self.param_groups for p in group["params"])
        self.noise = Noise(noise, table_size=table_size or (1 << 25 if on_gpu else 1 << 22), table_seed=seed,
                           chunk_size=chunk_size or (1 << 24 if on_gpu else 1 << 18))
        self.num_perturbations_done = 0
        self.trajectory: list[dict] = []
        self.base_sha256: str | None = None  # the weights before the first step (replay checks it)
        self.warned_training = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.is_contiguous():
                raise ValueError(f"{type(self).__name__} needs contiguous parameters; call .contiguous() on the "
                                 "model first")

    def trainable(self) -> Iterator[tuple[int, torch.Tensor, dict]]:
        """(index, tensor, group) of each trainable tensor; the index counts every tensor of the groups."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield index, p, group
                index += 1

    def step(self, closure: Callable[[], float | torch.Tensor]) -> float:  # type: ignore[override]
        raise NotImplementedError

    def next_seeds(self, count: int) -> list[int]:
        """The seeds of the step's ``count`` perturbations: the next ones of the stream."""
        return [mix(self.seed, self.num_perturbations_done + k) for k in range(count)]

    @contextmanager
    def in_step(self) -> Iterator[None]:
        """While the step's closure calls run: :func:`zo_objectives.step.current_step` says which step it is."""
        with in_step(self.seed, len(self.trajectory)):
            yield

    def member_losses(self, losses: Any, members: int, order: str = "") -> list[float]:
        """A batched closure's losses (a tensor or a sequence) as floats, one per member; a ValueError otherwise."""
        losses = [float(v) for v in (losses.reshape(-1).tolist() if isinstance(losses, torch.Tensor) else losses)]
        if len(losses) != members:
            raise ValueError(f"the closure returned {len(losses)} losses for {members} members: it must return one "
                             f"loss per member{order} (PopulationObjective does)")
        return losses

    def commit(self, seeds: list[int], grads: list[float | None], loss: float | None,
               kept: dict[tuple[int, int], torch.Tensor] | None = None, **facts: Any) -> float | None:
        """Record the step (seed k's noise moves the weights by ``-lr * grads[k] / len(seeds)``; None: skipped;
        ``facts``: more of the step the record keeps) and update; return ``loss``, the step's. ``kept``: z already
        made by the closure calls (see :meth:`_move`)."""
        record = {"seeds": seeds, "grads": grads, "loss": loss, "lrs": [g["lr"] for g in self.param_groups], **facts}
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
        if not self.trajectory and self.base_sha256 is None:  # the weights the trajectory must be replayed onto
            self.base_sha256 = weights_sha256(p for _, p, _ in self.trainable())
        with signals_deferred():
            moving = []
            for index, p, group in self.trainable():
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
        c, table = self.noise.chunk_size, self.noise.tabled
        for index, p, lr, wd in moving:
            half = p.dtype in HALF
            if table and not half and 0 < p.numel() <= c:
                batches.setdefault((p.device, lr, wd), []).append((index, p))
                continue
            flat = p.detach().view(-1)
            if half and p.device not in buffers:
                size = min(c, max(q.numel() for _, q, _ in self.trainable()))
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
                    if fused.update(chunk, zs[0], bits, decay, -lr * terms[0][1], eager_update):
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

    def refuse_nonfinite(self, losses: list[float], what: str) -> None:
        """Raise (on_nonfinite "raise", the weights unchanged) or warn (on_nonfinite "skip") when a batched step's
        ``losses`` hold a NaN or an inf; ``what`` names what is skipped (members, examples)."""
        if all(math.isfinite(v) for v in losses):
            return
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"non-finite loss among the members' {losses}; the weights are unchanged. "
                                     f"Pass on_nonfinite='skip' to skip such {what}")
        warnings.warn(f"skipping the {what} with non-finite losses ({losses})", stacklevel=3)

    def spsa_grads(self, pairs: list[tuple[float, float]]) -> list[float | None]:
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
        return {**{k: getattr(self, k) for k in self.settings}, **self.noise.config()}

    @classmethod
    def from_config(cls, params: Iterable, config: dict) -> Estimator:
        """An estimator over ``params`` with the settings of :meth:`config` (as a state_dict holds them)."""
        return cls(params, **{k: config[k] for k in cls.settings + NOISE_FIELDS})

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mezo"] = {"estimator": self.name, **self.config(), "base_sha256": self.base_sha256,
                         "num_perturbations_done": self.num_perturbations_done,
                         "params": describe_params(p for group in self.param_groups for p in group["params"]),
                         "trajectory": [dict(r) for r in self.trajectory]}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("mezo")
        if estimator_from_state({"mezo": saved}) is not type(self):
            raise ValueError(f"the state is of estimator {saved.get('estimator')!r}, not {self.name!r}")
        mismatched = {k: (v, saved.get(k)) for k, v in self.config().items() if saved.get(k) != v}
        if mismatched:
            raise ValueError(f"optimizer settings differ from the checkpoint's (now, saved): {mismatched}")
        super().load_state_dict(state_dict)
        self.num_perturbations_done = saved["num_perturbations_done"]
        self.trajectory = [dict(r) for r in saved["trajectory"]]
        self.base_sha256 = saved.get("base_sha256")

    def replay_record(self, record: dict) -> None:
        """Apply one trajectory record to the weights with the same arithmetic as training (bitwise)."""
        for group, lr in zip(self.param_groups, record["lrs"]):
            group["lr"] = lr
        self._apply(dict(record))


def describe_params(params: Iterable[torch.Tensor]) -> list[list]:
    """[dtype, shape] of each parameter: what replay checks the parameters it is given against."""
    return [[str(p.dtype).removeprefix("torch."), list(p.shape)] for p in params]


def weights_sha256(params: Iterable[torch.Tensor]) -> str:
    """sha256 over the tensors' dtypes, shapes and bytes, in order: identifies the weights a trajectory must
    be replayed onto."""
    digest = hashlib.sha256()
    for p in params:
        t = p.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
